"""predict.py in-process: LoRAs by URL (cached), COG_WEIGHTS as a local SD1.5 zip, switching back to the base, the
cog-sdxl inputs (image, mask, refine, apply_watermark, disable_safety_checker) and the recommended LoRA scale."""

from __future__ import annotations

import base64
import inspect
import io
import shutil

import numpy as np
import pytest
from PIL import Image

import predict
from trainer.inference import remote
from trainer.inference.service import PredictionInputs
from trainer.serving.cog_client import FileServer
from trainer.serving.common import ENV_ALLOW_LOCAL

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2, "seed": 11, "output_format": "png"}


@pytest.fixture(scope="module")
def served_loras(trained_sdxl, tmp_path_factory):
    """The session's trained zip (as `python -m trainer` writes it) served over http, plus a file that is not one."""
    folder = tmp_path_factory.mktemp("served-loras")
    shutil.copy(trained_sdxl["result"].zip_path, folder / "sdxl.zip")
    (folder / "notes.zip").write_text("not a zip")
    with FileServer(folder) as server:
        yield server


@pytest.fixture(scope="module")
def base_predictor(tmp_path_factory, model_cache):
    """A predictor started without weights: the default SDXL base (here the tiny one, set by environment)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("TRAINER_SDXL_MODEL", "tiny-sdxl")
    # The tiny companions, named as the tiny base model is: never used unless named.
    patch.setenv("TRAINER_SDXL_REFINER", "tiny-sdxl-refiner")
    patch.setenv("TRAINER_SAFETY_CHECKER", "tiny-safety-checker")
    patch.setenv("TRAINER_DEVICE", "cpu")
    patch.setenv("TRAINER_PREDICT_DIR", str(tmp_path_factory.mktemp("predict")))
    patch.setattr("trainer.utils.logs.setup_logging", lambda debug=False: None)  # keep pytest's logging
    predictor = predict.Predictor()
    predictor.setup(weights=None)
    yield predictor
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
    monkeypatch.setenv("TRAINER_DEVICE", "cpu")
    monkeypatch.setenv("TRAINER_PREDICT_DIR", str(tmp_path))
    monkeypatch.setenv("TRAINER_SAFETY_CHECKER", "tiny-safety-checker")
    monkeypatch.setattr("trainer.utils.logs.setup_logging", lambda debug=False: None)
    predictor = predict.Predictor()
    predictor.setup(weights=str(trained_sd15["result"].zip_path))
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
    monkeypatch.setenv("TRAINER_SDXL_MODEL", "tiny-sdxl")
    monkeypatch.setenv("TRAINER_SAFETY_CHECKER", str(tmp_path / "checker"))
    monkeypatch.setenv("TRAINER_DEVICE", "cpu")
    monkeypatch.setenv("TRAINER_PREDICT_DIR", str(tmp_path / "predict"))
    monkeypatch.setattr("trainer.utils.logs.setup_logging", lambda debug=False: None)
    predictor = predict.Predictor()
    predictor.setup(weights=None)
    return predictor


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
    monkeypatch.setenv("TRAINER_DISABLE_SAFETY_CHECKER", "1")
    monkeypatch.setenv("TRAINER_SAFETY_CHECKER", str(tmp_path / "never-loaded"))
    monkeypatch.setenv("TRAINER_SDXL_MODEL", "tiny-sdxl")
    monkeypatch.setenv("TRAINER_DEVICE", "cpu")
    monkeypatch.setenv("TRAINER_PREDICT_DIR", str(tmp_path / "predict"))
    monkeypatch.setattr("trainer.utils.logs.setup_logging", lambda debug=False: None)
    predictor = predict.Predictor()
    predictor.setup(weights=None)
    assert predictor.service.safety_checker is None
    assert _pixels(predictor.run(prompt="a dog", **SMALL)).any()
    # Nothing loaded the refiner yet (TRAINER_SDXL_REFINER is not even set here: the default hub id is never fetched).
    assert predictor.service.generator.refiner is None


@pytest.fixture(scope="module")
def served_eden(trained_sdxl, tmp_path_factory):
    """The same trained weights as Eden's trainer delivers them (tests/eden_reference.py), served over http."""
    from tests.eden_reference import eden_outputs

    outputs = eden_outputs(trained_sdxl["session"], tmp_path_factory.mktemp("eden"))
    with FileServer(outputs["tar"].parent.parent) as server:
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
    monkeypatch.setenv("TRAINER_DEVICE", "cpu")
    monkeypatch.setenv("TRAINER_PREDICT_DIR", str(tmp_path))
    monkeypatch.setenv("TRAINER_SAFETY_CHECKER", "tiny-safety-checker")
    monkeypatch.setattr("trainer.utils.logs.setup_logging", lambda debug=False: None)
    predictor = predict.Predictor()
    predictor.setup(weights=str(served_eden["tar"]))
    generator = predictor.service.generator
    assert generator.version == "sdxl" and generator.active.layout == "eden"
    assert generator.prompt_text("a photo of TOK") == "a photo of <s0><s1>"
    np.testing.assert_allclose(_pixels(predictor.run(prompt="a photo of TOK", **SMALL)), ours, atol=1.0)
