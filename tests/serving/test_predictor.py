"""predict.py in-process: LoRAs by URL (cached), COG_WEIGHTS as a local SD1.5 zip, switching back to the base, the
cog-sdxl inputs (image, mask, refine, apply_watermark, disable_safety_checker) and the recommended LoRA scale."""

from __future__ import annotations

import base64
import inspect
import io
import json
import logging
import re
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from tests.serving.conftest import start_predictor
from trainer.inference import remote
from trainer.inference.service import PredictionInputs
from trainer.tooling.cog_client import FileServer
from trainer.utils.download import ENV_ALLOW_PRIVATE_HOSTS
from trainer.utils.env import ENV_ALLOW_LOCAL

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2, "seed": 11, "output_format": "png"}


@pytest.fixture(scope="module")
def served_loras(trained_sdxl, tmp_path_factory):
    """The session's trained zip (as `python -m trainer` writes it) served over http, plus a file that is not one."""
    folder = tmp_path_factory.mktemp("served-loras")
    shutil.copy(trained_sdxl["result"].zip_path, folder / "sdxl.zip")
    (folder / "notes.zip").write_text("not a zip")
    with FileServer(folder) as server, pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV_ALLOW_PRIVATE_HOSTS, server.address)
        yield server


@pytest.fixture(scope="module")
def base_predictor(tmp_path_factory, model_cache):
    """A predictor started without weights: the default SDXL base (here the tiny one, set by environment)."""
    patch = pytest.MonkeyPatch()
    # The tiny companions, named as the tiny base model is: never used unless named.
    yield start_predictor(patch, tmp_path_factory.mktemp("predict"), TRAINER_SDXL_MODEL="tiny-sdxl",
                          TRAINER_SDXL_REFINER="tiny-sdxl-refiner", TRAINER_SAFETY_CHECKER="tiny-safety-checker")
    patch.undo()


def _pixels(paths) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) for p in paths])


def _picture(width: int, height: int, seed: int = 1) -> Image.Image:
    """A colourful starting image: a gradient with a random disc."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack([xx * 255 / width, yy * 255 / height, np.full_like(xx, 90.0)], axis=-1)
    cx, cy = rng.integers(0, width), rng.integers(0, height)
    image[(xx - cx) ** 2 + (yy - cy) ** 2 < (min(width, height) // 3) ** 2] = rng.integers(0, 255, 3)
    return Image.fromarray(image.astype(np.uint8))


def _square_mask(width: int, height: int) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return mask


def _data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_switching_loras_restores_the_base_model(base_predictor, served_loras, monkeypatch):
    downloads = []
    real_download = remote.download
    monkeypatch.setattr(remote, "download", lambda url, target, **kw: downloads.append(url) or
                        real_download(url, target, **kw))
    sdxl_url = served_loras.url("sdxl.zip")

    base = _pixels(base_predictor.run(prompt="a photo of a dog", **SMALL))
    with_lora = _pixels(base_predictor.run(prompt="a photo of TOK", lora_url=sdxl_url, **SMALL))
    assert np.abs(with_lora - base).mean() > 0.5, "the LoRA must change the image"
    again = _pixels(base_predictor.run(prompt="a photo of TOK", lora_url=sdxl_url, **SMALL))
    restored = _pixels(base_predictor.run(prompt="a photo of a dog", **SMALL))

    np.testing.assert_allclose(again, with_lora, atol=1.0)
    np.testing.assert_allclose(restored, base, atol=1.0)
    pipeline = base_predictor.service.generator.pipeline
    assert "<s0>" not in pipeline.tokenizer.get_vocab() and "<s0>" not in pipeline.tokenizer_2.get_vocab()
    assert downloads == [sdxl_url], "each URL is downloaded once"


def test_outputs_formats_and_count(base_predictor, served_loras):
    paths = base_predictor.run(prompt="TOK", lora_url=served_loras.url("sdxl.zip"), num_outputs=2,
                               **{**SMALL, "output_format": "webp"})
    assert [p.suffix for p in paths] == [".webp"] * 2 and all(p.is_file() for p in paths)
    jpg = base_predictor.run(prompt="TOK", **{**SMALL, "output_format": "jpg"})
    assert Image.open(jpg[0]).format == "JPEG"
    assert not paths[0].exists(), "a request's files are removed when the next one writes its own"


def test_local_lora_paths_need_the_operator_flag(base_predictor, trained_sdxl, monkeypatch):
    zip_path = str(trained_sdxl["result"].zip_path)
    monkeypatch.delenv(ENV_ALLOW_LOCAL, raising=False)
    with pytest.raises(ValueError, match="local paths are not accepted here"):
        base_predictor.run(prompt="TOK", lora_url=zip_path, **SMALL)
    monkeypatch.setenv(ENV_ALLOW_LOCAL, "1")
    assert base_predictor.run(prompt="TOK", lora_url=zip_path, **SMALL)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"prompt": ""}, "prompt: String should have at least 1 character"),
        ({"prompt": "TOK " * 1000}, "prompt: String should have at most 2000 characters"),
        ({"guidance_scale": float("nan")}, "guidance_scale: Input should be a finite number"),
        ({"width": 70}, r"width: must be a multiple of 8 \(got 70\)"),
        ({"num_outputs": 9}, "num_outputs: Input should be less than or equal to 4"),
        ({"scheduler": "euler"}, "scheduler: Input should be 'DDIM'"),
        ({"output_format": "gif"}, "output_format: Input should be 'webp', 'png' or 'jpg'"),
        ({"lora_url": "ftp://host/x.zip"}, "use an http\\(s\\):// URL or an s3:// URI"),
        ({"refine": "refiner"}, "refine: Input should be 'no_refiner', 'expert_ensemble_refiner' or"),
        ({"prompt_strength": 1.5}, "prompt_strength: Input should be less than or equal to 1"),
        ({"mask": "data:image/png;base64,AAAA"}, "mask: inpainting needs the image to repaint too; give image"),
        ({"image": "/etc/hostname"}, "image: local paths are not accepted here"),
        ({"image": "data:text/plain;base64,aGVsbG8="}, "image: not an image in a supported format"),
        ({"image": "RGB64", "mask": "RGBMASK64"}, "mask: must be greyscale \\(white = repaint, black = keep\\)"),
        ({"image": "RGB64", "mask": "MASK32"}, "mask: 32×32 does not match the image's 64×64"),
        ({"image": "RGB64", "prompt_strength": 0.0}, "prompt_strength: 0 of 2 num_inference_steps leaves no"),
        ({"refine": "base_image_refiner", "refine_steps": 2}, "refine_steps: base_image_refiner runs 0.3 of its 2"),
    ],
)
def test_bad_requests_say_what_is_wrong(base_predictor, given, message):
    pictures = {"RGB64": _data_uri(_picture(64, 64)), "RGBMASK64": _data_uri(_picture(64, 64, seed=2)),
                "MASK32": _data_uri(_square_mask(32, 32))}
    given = {key: pictures.get(value, value) if isinstance(value, str) else value for key, value in given.items()}
    with pytest.raises(ValueError, match=message):
        base_predictor.run(**{"prompt": "TOK", **SMALL, **given})


def test_a_url_that_is_not_a_trained_zip_is_refused_and_not_cached(base_predictor, served_loras):
    url = served_loras.url("notes.zip")
    with pytest.raises(ValueError, match=r"notes.zip\): weights.zip is not a zip file"):
        base_predictor.run(prompt="TOK", lora_url=url, **SMALL)
    assert not (base_predictor.service.store.root / "urls" / remote._digest(url)).exists()


def test_weights_at_setup_from_a_local_zip(trained_sd15, tmp_path, monkeypatch, model_cache):
    """COG_WEIGHTS may be a local path (the operator sets it); TOK becomes the trained tokens."""
    predictor = start_predictor(monkeypatch, tmp_path, str(trained_sd15["result"].zip_path),
                                TRAINER_SAFETY_CHECKER="tiny-safety-checker")
    generator = predictor.service.generator
    assert generator.version == "sd15" and generator.active is not None
    assert generator.prompt_text("in the style of TOK") == "in the style of <s0><s1>"
    assert len(predictor.run(prompt="in the style of TOK", **SMALL)) == 1
    # SD1.5 has img2img and inpainting, but no refiner.
    start = _data_uri(_picture(64, 64))
    assert len(predictor.run(prompt="TOK", image=start, mask=_data_uri(_square_mask(64, 64)), **SMALL)) == 1
    for refine in ("expert_ensemble_refiner", "base_image_refiner"):
        with pytest.raises(ValueError, match=f"refine: {refine} needs an SDXL base model, and this LoRA's is SD1.5"):
            predictor.run(prompt="TOK", refine=refine, **SMALL)


def test_predict_signature_matches_the_validation():
    """predict.py's schema (defaults, bounds, choices) is what PredictionInputs enforces."""
    parameters = inspect.signature(predict.Predictor.run).parameters
    fields = PredictionInputs.model_fields
    assert [name for name in parameters if name != "self"] == list(fields)
    for name, field in fields.items():
        declared = parameters[name].default
        lengths = {type(m).__name__: m for m in field.metadata}
        assert declared.max_length == (lengths["MaxLen"].max_length if "MaxLen" in lengths else None), name
        if name == "prompt":
            assert declared.default is None and field.is_required()
            continue
        assert declared.default == field.default, name
        bounds = {type(m).__name__: m for m in field.metadata}
        assert declared.ge == (bounds["Ge"].ge if "Ge" in bounds else None), name
        assert declared.le == (bounds["Le"].le if "Le" in bounds else None), name
        literal = getattr(field.annotation, "__args__", None)
        if declared.choices is not None:
            assert tuple(declared.choices) == literal, name


# replicate/cog-sdxl's predict.py: the defaults its clients rely on when they leave an input out.
COG_SDXL_DEFAULTS = {"prompt_strength": 0.8, "refine": "no_refiner", "high_noise_frac": 0.8, "refine_steps": None,
                     "apply_watermark": True, "disable_safety_checker": False, "scheduler": "K_EULER",
                     "guidance_scale": 7.5, "num_outputs": 1, "image": None, "mask": None}


def test_inputs_left_out_mean_what_they_mean_in_cog_sdxl():
    parameters = inspect.signature(predict.Predictor.run).parameters
    assert {name: parameters[name].default.default for name in COG_SDXL_DEFAULTS} == COG_SDXL_DEFAULTS


def test_without_an_evaluation_the_default_lora_scale_is_one(base_predictor, served_loras, trained_sdxl):
    """A zip without an evaluation report renders at lora_scale 1.0 when the request gives none."""
    with zipfile.ZipFile(trained_sdxl["result"].zip_path) as archive:
        assert not [name for name in archive.namelist() if name.startswith("evaluation/")]
    url = served_loras.url("sdxl.zip")
    default = _pixels(base_predictor.run(prompt="a photo of TOK", lora_url=url, **SMALL))
    one = _pixels(base_predictor.run(prompt="a photo of TOK", lora_url=url, lora_scale=1.0, **SMALL))
    half = _pixels(base_predictor.run(prompt="a photo of TOK", lora_url=url, lora_scale=0.5, **SMALL))
    np.testing.assert_array_equal(default, one)
    assert np.abs(default - half).mean() > 0.5, "the scale must matter for this LoRA"


# ------------------------------------------------------------------------------------------- cog-sdxl's inputs
def test_img2img_and_inpainting_take_the_size_of_the_image(base_predictor, served_loras):
    start = _picture(96, 64)
    (served_loras.folder / "start.png").write_bytes(base64.b64decode(_data_uri(start).split(",", 1)[1]))
    from_url = base_predictor.run(prompt="a photo of TOK", lora_url=served_loras.url("sdxl.zip"),
                                  image=served_loras.url("start.png"), **{**SMALL, "width": None, "height": None})
    assert Image.open(from_url[0]).size == (96, 64)
    wider = base_predictor.run(prompt="a dog", image=_data_uri(start), **{**SMALL, "width": 128, "height": None})
    assert Image.open(wider[0]).size == (128, 88), "one side given: the other keeps the aspect ratio"

    mask = _square_mask(96, 64)
    inpainted = base_predictor.run(prompt="a dog", image=_data_uri(start), mask=_data_uri(mask), num_outputs=2,
                                   prompt_strength=1.0, **{**SMALL, "width": None, "height": None})
    keep = np.asarray(mask) == 0
    difference = np.abs(_pixels(inpainted) - np.asarray(start, dtype=np.float32))
    assert difference.shape == (2, 64, 96, 3)
    assert difference[:, keep].max() <= 1.0 and difference[:, ~keep].mean() > 10.0


def test_refiner_modes_through_the_predictor(base_predictor, served_loras):
    for refine in ("expert_ensemble_refiner", "base_image_refiner"):
        result = base_predictor.service.run({"prompt": "a photo of TOK", "lora_url": served_loras.url("sdxl.zip"),
                                             "refine": refine, "refine_steps": 10, **{**SMALL,
                                                                                      "num_inference_steps": 5}})
        steps = base_predictor.service.generator.last_steps
        assert Image.open(result.paths[0]).size == (64, 64) and steps.refiner
        assert result.total_steps == len(steps.base) + len(steps.refiner)
        assert "<s0>" not in steps.refiner_prompt and "TOK" not in steps.refiner_prompt


def test_outputs_carry_the_watermark_unless_refused(base_predictor):
    from trainer.inference.watermark import payload_bits, read_watermark

    request = {"prompt": "a dog", **SMALL, "width": 256, "height": 256}
    expected = payload_bits("sdxl")
    marked = read_watermark(Image.open(base_predictor.run(**request)[0]), "sdxl")
    plain = read_watermark(Image.open(base_predictor.run(**request, apply_watermark=False)[0]), "sdxl")
    # Stability's detector: more than 35 of 48 bits is "very likely watermarked".
    assert sum(a == b for a, b in zip(marked, expected, strict=True)) > 35
    assert sum(a == b for a, b in zip(plain, expected, strict=True)) <= 33


@pytest.fixture
def flagging_predictor(tmp_path, model_cache, monkeypatch):
    """A predictor whose safety checker (tiny, built from config) flags every image."""
    from trainer.models.tiny import build_tiny_safety_checker

    build_tiny_safety_checker(tmp_path / "checker", flag_everything=True)
    return start_predictor(monkeypatch, tmp_path / "predict", TRAINER_SDXL_MODEL="tiny-sdxl",
                           TRAINER_SAFETY_CHECKER=str(tmp_path / "checker"))


def test_flagged_outputs_are_black_and_reported(flagging_predictor, monkeypatch, caplog):
    metrics = {}
    monkeypatch.setattr(flagging_predictor, "record_metric", lambda key, value, mode="replace":
                        metrics.__setitem__(key, value))
    with caplog.at_level("WARNING"):
        paths = flagging_predictor.run(prompt="a dog", num_outputs=2, **SMALL)
    assert len(paths) == 2 and not _pixels(paths).any(), "black images, in place"
    assert metrics["nsfw_outputs"] == [0, 1] and metrics["total_inference_steps"] == 2
    assert "output 1 of 2 was flagged by the safety checker" in caplog.text
    allowed = flagging_predictor.run(prompt="a dog", disable_safety_checker=True, **SMALL)
    assert _pixels(allowed).any() and metrics["nsfw_outputs"] == []


def test_the_operator_can_turn_the_checker_off_and_the_refiner_waits_for_its_first_use(tmp_path, model_cache,
                                                                                       monkeypatch):
    predictor = start_predictor(monkeypatch, tmp_path / "predict", TRAINER_DISABLE_SAFETY_CHECKER="1",
                                TRAINER_SAFETY_CHECKER=str(tmp_path / "never-loaded"), TRAINER_SDXL_MODEL="tiny-sdxl")
    assert predictor.service.safety_checker is None
    assert _pixels(predictor.run(prompt="a dog", **SMALL)).any()
    # Nothing loaded the refiner yet (TRAINER_SDXL_REFINER is not even set here: the default hub id is never fetched).
    assert predictor.service.generator.refiner is None


@pytest.fixture(scope="module")
def served_eden(served_loras, trained_sdxl, tmp_path_factory):
    """The same trained weights as Eden's trainer delivers them (tests/eden_reference.py), served over http."""
    from tests.eden_reference import eden_outputs

    outputs = eden_outputs(trained_sdxl["session"], tmp_path_factory.mktemp("eden"))
    with FileServer(outputs["tar"].parent.parent) as server, pytest.MonkeyPatch.context() as patch:
        # The guarded client reaches this one server besides served_loras' (the operator's allow list, per port).
        patch.setenv(ENV_ALLOW_PRIVATE_HOSTS, f"{served_loras.address},{server.address}")
        yield {"server": server, **outputs}


def test_edens_tar_zip_and_folder_give_the_images_of_our_zip(base_predictor, served_loras, served_eden,
                                                            monkeypatch):
    ours = _pixels(base_predictor.run(prompt="a photo of TOK", lora_url=served_loras.url("sdxl.zip"), **SMALL))
    server, root = served_eden["server"], served_eden["tar"].parent.parent
    for form in ("tar", "zip"):
        url = server.url(served_eden[form].relative_to(root))
        edens = _pixels(base_predictor.run(prompt="a photo of TOK", lora_url=url, **SMALL))
        np.testing.assert_allclose(edens, ours, atol=1.0, err_msg=form)
        assert base_predictor.service.generator.active.layout == "eden"

    folder = str(served_eden["folder"])
    monkeypatch.delenv(ENV_ALLOW_LOCAL, raising=False)
    with pytest.raises(ValueError, match="local paths are not accepted here"):
        base_predictor.run(prompt="a photo of TOK", lora_url=folder, **SMALL)
    monkeypatch.setenv(ENV_ALLOW_LOCAL, "1")
    edens = _pixels(base_predictor.run(prompt="a photo of TOK", lora_url=folder, **SMALL))
    np.testing.assert_allclose(edens, ours, atol=1.0)


def test_edens_tar_as_weights_at_setup(base_predictor, served_loras, served_eden, tmp_path, monkeypatch, model_cache):
    """COG_WEIGHTS may name Eden's tar (here a local file, as the operator may set it)."""
    ours = _pixels(base_predictor.run(prompt="a photo of TOK", lora_url=served_loras.url("sdxl.zip"), **SMALL))
    predictor = start_predictor(monkeypatch, tmp_path, str(served_eden["tar"]),
                                TRAINER_SAFETY_CHECKER="tiny-safety-checker")
    generator = predictor.service.generator
    assert generator.version == "sdxl" and generator.active.layout == "eden"
    assert generator.prompt_text("a photo of TOK") == "a photo of <s0><s1>"
    np.testing.assert_allclose(_pixels(predictor.run(prompt="a photo of TOK", **SMALL)), ours, atol=1.0)


# ------------------------------------------------------------------------------------------ hostile bundles
def _members(trained_sdxl) -> dict[str, bytes]:
    with zipfile.ZipFile(trained_sdxl["result"].zip_path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _serve_variant(served_loras, name: str, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(served_loras.folder / name, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    return served_loras.url(name)


def _lora_name(members: dict[str, bytes]) -> str:
    return next(name for name in members if name.endswith("_lora.safetensors"))


def _edit_tensors(members: dict[str, bytes], name: str, change) -> dict[str, bytes]:
    from safetensors.torch import load, save

    tensors = load(members[name])
    change(tensors)
    return {**members, name: save(tensors)}


def _lora_variant(kind: str):
    def change(tensors):
        key = next(k for k in tensors if k.endswith(".lora_down.weight"))
        if kind == "shape":
            tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)
        elif kind == "nan":
            for k in tensors:
                tensors[k] = torch.full_like(tensors[k], float("nan"))
        elif kind == "unknown":
            module = key[: -len(".lora_down.weight")]
            for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
                tensors[f"lora_unet_input_blocks_99_1_proj_in{suffix}"] = tensors[module + suffix].clone()
    return change


@pytest.mark.parametrize(("kind", "message"), [
    ("shape", r"this LoRA does not match the base model: lora_\w+\.lora_down\.weight has shape .*; the layer takes"),
    ("nan", r"this LoRA does not match the base model: .* holds NaN or infinite values"),
    ("unknown", r"this LoRA does not match the base model: lora_unet_input_blocks_99_1_proj_in names no layer"),
])
def test_a_lora_that_does_not_fit_is_refused_by_name(base_predictor, served_loras, trained_sdxl, kind, message):
    members = _members(trained_sdxl)
    url = _serve_variant(served_loras, f"{kind}.zip", _edit_tensors(members, _lora_name(members),
                                                                   _lora_variant(kind)))
    with pytest.raises(ValueError, match=message):
        base_predictor.run(prompt="TOK", lora_url=url, **SMALL)
    # The failed activation left nothing behind: the next request renders the plain base model.
    assert base_predictor.service.generator.active is None
    assert base_predictor.run(prompt="a dog", **SMALL)


def test_token_vectors_that_do_not_fit_are_refused(base_predictor, served_loras, trained_sdxl):
    members = _members(trained_sdxl)
    name = next(n for n in members if n.endswith("_embeddings.safetensors"))

    def widen(tensors):
        tensors["clip_l"] = torch.zeros(tensors["clip_l"].shape[0], tensors["clip_l"].shape[1] + 1)

    url = _serve_variant(served_loras, "wide-tokens.zip", _edit_tensors(members, name, widen))
    with pytest.raises(ValueError, match=r"this LoRA does not match the base model: .*clip_l has shape"):
        base_predictor.run(prompt="TOK", lora_url=url, **SMALL)

    def poison(tensors):
        tensors["clip_g"] = tensors["clip_g"].clone()
        tensors["clip_g"][0, 0] = float("nan")
        tensors["clip_l"] = tensors["clip_l"].clone()
        tensors["clip_l"][-1, -1] = float("inf")

    url = _serve_variant(served_loras, "nan-tokens.zip", _edit_tensors(members, name, poison))
    with pytest.raises(ValueError, match=r"this LoRA does not match the base model: .*holds NaN or infinite values"):
        base_predictor.run(prompt="TOK", lora_url=url, **SMALL)
    base = _pixels(base_predictor.run(prompt="a photo of a dog", **SMALL))
    assert np.isfinite(base).all() and base.std() > 0, "the next request renders normally"


@pytest.mark.parametrize(("member", "text", "message"), [
    ("training_args.json", "[1, 2]", "training_args.json must hold a JSON object, got a JSON list"),
    ("special_params.json", '["TOK"]', "special_params.json must map the trigger to the new tokens"),
    ("special_params.json", json.dumps({"TOK": "x" * 100_000}), r"maps 'TOK' to 'xxx.*\(100000 characters\)', not"),
    ("training_args.json", "[" * 100_000 + "]" * 100_000, "training_args.json is nested too deeply to read"),
])
def test_bundle_files_of_the_wrong_shape_get_clear_errors(base_predictor, served_loras, trained_sdxl, member, text,
                                                          message):
    url = _serve_variant(served_loras, f"bad-{member}-{len(text)}.zip", {**_members(trained_sdxl),
                                                                         member: text.encode()})
    with pytest.raises(ValueError, match=message):
        base_predictor.run(prompt="TOK", lora_url=url, **SMALL)
    assert not any((base_predictor.service.store.root / "urls").iterdir()) or all(
        (entry / "weights.zip").is_file() for entry in (base_predictor.service.store.root / "urls").iterdir())


def test_a_file_folder_clash_in_a_bundle_is_not_a_raw_error(base_predictor, served_loras, trained_sdxl):
    members = _members(trained_sdxl)
    clash = {**members, "samples/README.md/evil.txt": b"x", "loss.csv/inner": b"y"}
    url = _serve_variant(served_loras, "clash.zip", clash)
    assert base_predictor.run(prompt="TOK", lora_url=url, **SMALL)


def test_a_lora_zip_bomb_is_refused_and_nothing_stays_cached(base_predictor, served_loras, trained_sdxl):
    """The issue's case: a small LoRA zip that unpacks to far more than it holds."""
    from tests.data.factories import RawMember, handmade_zip

    zeros = RawMember.of("samples/zeros.bmp", bytes(40 << 20))
    members = [RawMember.of(name, data) for name, data in _members(trained_sdxl).items()]
    payload = handmade_zip([*members, *(RawMember(f"samples/pad{i}.bmp", zeros.packed, zeros.size, zeros.crc)
                                        for i in range(8))])
    (served_loras.folder / "bomb.zip").write_bytes(payload)
    url = served_loras.url("bomb.zip")
    with pytest.raises(ValueError, match=r"bomb.zip\): .*over 20 times its packed size"):
        base_predictor.run(prompt="TOK", lora_url=url, **SMALL)
    assert not (base_predictor.service.store.root / "urls" / remote._digest(url)).exists()


def test_a_full_unet_whose_config_asks_for_another_size_is_refused(base_predictor, served_loras, trained_sdxl):
    """The issue's case: unet/config.json with sample_size 100000 would set the default size past the cap."""
    members = _members(trained_sdxl)
    unet = base_predictor.service.generator.pipeline.unet
    config = {**dict(unet.config), "sample_size": 100000}
    from safetensors.torch import save

    variant = {name: data for name, data in members.items() if not name.endswith("_lora.safetensors")}
    variant["unet/config.json"] = json.dumps(config).encode()
    variant["unet/diffusion_pytorch_model.safetensors"] = save({"unused": torch.zeros(1)})  # refused before loading
    url = _serve_variant(served_loras, "big-unet.zip", variant)
    with pytest.raises(ValueError, match=r"this LoRA does not match the base model: unet/config.json sets sample_size "
                                         r"to 100000"):
        base_predictor.run(prompt="TOK", lora_url=url, **SMALL)


@pytest.mark.parametrize("where", ["ckpt_path", "pretrained_model"])
def test_a_bundle_may_not_choose_a_local_model_or_an_internal_url(base_predictor, served_loras, trained_sdxl,
                                                                  tmp_path, where):
    """training_args.json comes with the zip: a server path is refused without a look at the disk, an internal URL
    without a connection."""
    from tests.utils.conftest import ScriptedServer

    internal = ScriptedServer()
    try:
        members = _members(trained_sdxl)
        args = json.loads(members["training_args.json"])
        for index, location in enumerate((str(tmp_path), internal.url("/model.safetensors"),
                                          internal.url("/m.safetensors", host="2130706433"))):
            if where == "ckpt_path":
                changed = {**args, "ckpt_path": location}
            else:
                changed = {**args, "ckpt_path": None, "pretrained_model": {"url": location, "path": location}}
            url = _serve_variant(served_loras, f"base-{where}-{index}.zip",
                                 {**members, "training_args.json": json.dumps(changed).encode()})
            with pytest.raises(ValueError, match=r"(local paths are not accepted here|is a loopback address)"):
                base_predictor.run(prompt="TOK", lora_url=url, **SMALL)
        assert internal.connections == 0
    finally:
        internal.close()


# ------------------------------------------------------------------------------------- hostile Eden bundles
def _eden_members(served_eden) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(served_eden["folder"].iterdir()) if p.is_file()}


def _serve_tar(served_loras, name: str, members: dict[str, bytes], compression: str = "") -> str:
    """Eden's tar layout (files at the top), written member by member so that any name can be given."""
    with tarfile.open(served_loras.folder / name, f"w:{compression}") as tar:
        for member, data in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return served_loras.url(name)


def _refused(predictor, url: str) -> str:
    """The message of a refused LoRA URL, after checking that nothing of it stays in the LoRA cache."""
    with pytest.raises(ValueError) as caught:
        predictor.run(prompt="TOK", lora_url=url, **SMALL)
    root = predictor.service.store.root
    assert not (root / "urls" / remote._digest(url)).exists()
    assert not [p for p in root.rglob("*") if ".partial-" in p.name], "a partial unpack stayed in the cache"
    return str(caught.value)


@pytest.mark.parametrize(("case", "pattern"), [
    # Our zip names the bomb member (its declared ratio); a streamed tar is stopped as a whole while it inflates.
    ("bomb", r"^LoRA location http://[\d.:]+/eden-bomb\.(zip|tar\.gz) \(eden-bomb\.(zip|tar\.gz)\): "
             r"(samples/zeros\.bmp \(in weights\.zip\)|weights\.zip): unpacks to [\d.]+ MiB (or more )?from "
             r"[\d.]+ KiB, over 20 times its packed size \(a (zip|tar) bomb\); the archive is refused$"),
    ("many", r"^LoRA location http://[\d.:]+/eden-many\.(zip|tar) \(eden-many\.(zip|tar)\): weights\.zip: "
             r"(\d+ entries, )?more than the limit of 2000 entries per archive; split it into smaller archives$"),
])
def test_an_eden_tar_is_refused_like_a_zip_and_leaves_nothing_cached(base_predictor, served_loras, served_eden,
                                                                     case, pattern):
    """Eden's .tar (plain, or recompressed as .tar.gz) goes through the bundle limits of our zip: the same refusal,
    the same clean cache."""
    members = _eden_members(served_eden)
    if case == "bomb":
        members["samples/zeros.bmp"] = bytes(40 << 20)
        urls = {"zip": _serve_variant(served_loras, "eden-bomb.zip", members),
                "tar": _serve_tar(served_loras, "eden-bomb.tar.gz", members, "gz")}
    else:
        members.update({f"pad/{i}.txt": b"" for i in range(2001)})
        urls = {"zip": _serve_variant(served_loras, "eden-many.zip", members),
                "tar": _serve_tar(served_loras, "eden-many.tar", members)}
    messages = {form: _refused(base_predictor, url) for form, url in urls.items()}
    for form, message in messages.items():
        assert re.match(pattern, message), (form, message)
    assert ("zip bomb" in messages["zip"] and "tar bomb" in messages["tar"]) if case == "bomb" else True


def test_an_eden_tar_with_climbing_names_and_links_is_unpacked_like_a_zip(base_predictor, served_loras, served_eden,
                                                                          tmp_path, caplog):
    """Names that climb out, absolute names and links are skipped with the zip's warnings; nothing lands outside
    the bundle's folder, and the rest of the bundle works."""
    members = {**_eden_members(served_eden), "../escape.txt": b"x", "/tmp/absolute-m9.txt": b"x",
               "a/../../climb.txt": b"x"}
    skips = {}
    for form, url in (("zip", _serve_variant(served_loras, "eden-climb.zip", members)),
                      ("tar", _serve_tar(served_loras, "eden-climb.tar", members))):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert base_predictor.run(prompt="a photo of TOK", lora_url=url, **SMALL)
        bundle = base_predictor.service.generator.active
        assert bundle.layout == "eden" and bundle.lora is not None
        root = base_predictor.service.store.root
        assert not [p for p in root.parent.rglob("*") if p.name in ("escape.txt", "absolute-m9.txt", "climb.txt")]
        skips[form] = sorted(r.getMessage() for r in caplog.records if "unsafe path in archive" in r.getMessage())
    assert len(skips["zip"]) == 3 and skips["zip"] == skips["tar"], skips
    assert not Path("/tmp/absolute-m9.txt").exists()


@pytest.mark.parametrize("where", ["ckpt_path", "pretrained_model"])
def test_an_eden_bundle_may_not_choose_a_local_model_or_an_internal_url(base_predictor, served_loras, served_eden,
                                                                        tmp_path, where):
    """Eden's training_args.json names its base model by the same keys as ours, and is as untrusted: in a .tar too,
    a server path is refused without a look at the disk, an internal URL without a connection."""
    from tests.utils.conftest import ScriptedServer

    internal = ScriptedServer()
    try:
        members = _eden_members(served_eden)
        args = json.loads(members["training_args.json"])
        for index, location in enumerate((str(tmp_path), internal.url("/model.safetensors"),
                                          internal.url("/m.safetensors", host="2130706433"))):
            if where == "ckpt_path":
                changed = {**args, "ckpt_path": location}
            else:
                changed = {**args, "ckpt_path": None, "pretrained_model": {"url": location, "path": location,
                                                                           "version": "sdxl"}}
            url = _serve_tar(served_loras, f"eden-base-{where}-{index}.tar",
                             {**members, "training_args.json": json.dumps(changed).encode()})
            with pytest.raises(ValueError, match=r"(local paths are not accepted here|is a loopback address)"):
                base_predictor.run(prompt="TOK", lora_url=url, **SMALL)
        assert internal.connections == 0
    finally:
        internal.close()
