"""Eden's outputs in our predictor core: its ``.tar``, its folder and the same files zipped, with its file names and
its diffusers-named LoRA keys, give the images of the same weights in our own layout."""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests import eden_reference as eden
from trainer.inference.bundle import LoraBundle
from trainer.inference.generator import GenerationRequest, Generator


def _request(**overrides):
    values = {"prompt": "a photo of TOK", "width": 64, "height": 64, "num_inference_steps": 3, "seed": 3,
              "guidance_scale": 5.0}
    values.update(overrides)
    return GenerationRequest(**values)


def _pixels(images):
    return np.stack([np.asarray(image, dtype=np.float32) for image in images])


def _zip_folder(folder, path):
    with zipfile.ZipFile(path, "w") as archive:
        for entry in sorted(folder.rglob("*")):
            archive.write(entry, entry.relative_to(folder).as_posix())
    return path


@pytest.fixture(scope="module")
def eden_sdxl(trained_sdxl, tmp_path_factory):
    return eden.eden_outputs(trained_sdxl["session"], tmp_path_factory.mktemp("eden-sdxl"))


@pytest.fixture(scope="module")
def eden_sd15(trained_sd15, tmp_path_factory):
    return eden.eden_outputs(trained_sd15["session"], tmp_path_factory.mktemp("eden-sd15"))


@pytest.fixture
def generator(model_cache):
    return Generator(device="cpu", weight_type="fp32")


def test_the_eden_output_follows_edens_layout(eden_sdxl):
    """The files the tests build are Eden's: its names, its keys in diffusers block names, its tar."""
    folder = eden_sdxl["folder"]
    names = {p.name for p in folder.iterdir()}
    assert {"eden_concept_sdxl.safetensors", "eden_concept_embeddings.safetensors", "special_params.json",
            "training_args.json", "adapter_config.json"} <= names
    assert "pytorch_lora_weights.safetensors" not in names
    keys = load_file(str(folder / "eden_concept_sdxl.safetensors"))
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert not any("input_blocks" in key or "base_model" in key for key in keys)
    assert any(key.startswith("lora_te1_text_model_encoder_layers_0") for key in keys)
    assert eden_sdxl["tar"].name == "eden_concept_eden_concept_lora_1718000000.tar"
    with tarfile.open(eden_sdxl["tar"]) as tar:
        assert {"README.md", "special_params.json", "eden_concept_sdxl.safetensors"} <= set(tar.getnames())


@pytest.mark.parametrize("form", ["tar", "folder", "zip"])
def test_an_eden_output_opens_as_tar_folder_and_zip(eden_sdxl, form, tmp_path):
    bundle = LoraBundle.open(eden_sdxl[form], tmp_path)
    assert bundle.layout == "eden" and bundle.version == "sdxl"
    assert bundle.lora.name == "eden_concept_sdxl.safetensors"
    assert bundle.embeddings.name == "eden_concept_embeddings.safetensors" and bundle.unet_dir is None
    assert bundle.tokens == ["<s0>", "<s1>"]  # Eden's rule: one <s{i}> per embedding row
    assert bundle.trigger == "TOK" and bundle.token_string == "<s0><s1>"
    assert bundle.base_source(tmp_path).location == "tiny-sdxl"


@pytest.mark.parametrize(("ours", "edens"), [("trained_sdxl", "eden_sdxl"), ("trained_sd15", "eden_sd15")])
def test_edens_layout_gives_the_images_of_ours(generator, ours, edens, request, tmp_path):
    ours, edens = request.getfixturevalue(ours), request.getfixturevalue(edens)
    prompt = "in the style of TOK" if ours["session"].config.concept_mode == "style" else "a photo of TOK"
    our_bundle = LoraBundle.open(ours["result"].zip_path, tmp_path / "ours")
    eden_bundle = LoraBundle.open(edens["tar"], tmp_path / "eden")

    generator.load_base(our_bundle.base_source(tmp_path))
    base = _pixels(generator.generate(_request(prompt=prompt.replace("TOK", "a dog"))))
    generator.activate(our_bundle)
    from_ours = _pixels(generator.generate(_request(prompt=prompt)))
    generator.activate(eden_bundle)
    assert generator.prompt_text(prompt) == prompt.replace("TOK", "<s0><s1>")
    from_eden = _pixels(generator.generate(_request(prompt=prompt)))

    np.testing.assert_allclose(from_eden, from_ours, atol=1.0)
    assert np.abs(from_ours - base).mean() > 0.5, "the LoRA and tokens must change the image"
    generator.deactivate()
    assert "<s0>" not in generator.pipeline.tokenizer.get_vocab()


def test_edens_full_unet_layout_gives_the_images_of_ours(generator, trained_sd15, tmp_path):
    """Eden's ``is_lora: false`` saves the UNet beside the other files; ours in ``unet/``."""
    from diffusers import UNet2DConditionModel

    from trainer.models.loading import model_cache_dir
    from trainer.models.tiny import tiny_model_dir

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir("tiny-sd15", model_cache_dir()), subfolder="unet")
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    ours, edens = tmp_path / "ours", tmp_path / "eden"
    unet.save_pretrained(ours / "unet")
    unet.save_pretrained(edens)
    args = {"sd_model_version": "sd15", "ckpt_path": "tiny-sd15", "is_lora": False, "name": "full",
            "concept_mode": "object", "inserting_list_tokens": ["<s0>"],
            "training_attributes": {"trigger_text": "TOK, "}}
    for folder in (ours, edens):
        (folder / "training_args.json").write_text(json.dumps(args))
        (folder / "special_params.json").write_text(json.dumps({"TOK": "TOK"}))
    eden_bundle = LoraBundle.open(edens)
    assert eden_bundle.layout == "eden" and eden_bundle.unet_dir == edens and eden_bundle.lora is None

    generator.activate(LoraBundle.open(ours))
    from_ours = _pixels(generator.generate(_request()))
    generator.activate(eden_bundle)
    from_eden = _pixels(generator.generate(_request()))
    np.testing.assert_allclose(from_eden, from_ours, atol=1.0)


def _tar_with(path, members: dict[str, bytes], links: dict[str, str] | None = None):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


def test_an_eden_tar_is_unpacked_by_the_archive_rules(eden_sdxl, tmp_path):
    """Names that climb out, absolute names and links are skipped; the bundle itself still opens."""
    folder = eden_sdxl["folder"]
    members = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    members.update({"../escape.txt": b"x", "/tmp/absolute.txt": b"x"})
    archive = _tar_with(tmp_path / "evil_eden_concept_lora_1.tar", members, links={"link": "/etc/passwd"})
    bundle = LoraBundle.open(archive, tmp_path / "work")
    assert bundle.layout == "eden" and bundle.lora is not None
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "work" / "escape.txt").exists()
    assert not any(p.is_symlink() for p in bundle.folder.rglob("*"))
    assert not (bundle.folder / "escape.txt").exists()


def test_an_eden_folder_packed_one_level_down_opens(eden_sdxl, tmp_path):
    shutil.copytree(eden_sdxl["folder"], tmp_path / "pack" / "checkpoint-16")
    archive = _zip_folder(tmp_path / "pack", tmp_path / "nested.zip")
    bundle = LoraBundle.open(archive, tmp_path / "work")
    assert bundle.folder.name == "checkpoint-16" and bundle.layout == "eden"


def test_an_archive_of_neither_layout_says_which_files_were_expected(tmp_path):
    files = {"notes.txt": b"hello", "picture.png": b"\x89PNG", "training_args.json": b"{}"}
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    _tar_with(tmp_path / "other.tar", files)
    folder = tmp_path / "other"
    folder.mkdir()
    for name, data in {**files, "special_params.json": b"{}", "random.safetensors": b"not safetensors"}.items():
        (folder / name).write_bytes(data)

    for source, found in ((tmp_path / "other.zip", "notes.txt, picture.png, training_args.json"),
                          (tmp_path / "other.tar", "notes.txt, picture.png, training_args.json"),
                          (folder, "notes.txt, picture.png, random.safetensors, special_params.json")):
        with pytest.raises(ValueError) as caught:
            LoraBundle.open(source, tmp_path / "work")
        message = str(caught.value)
        assert source.name in message, message
        assert "expected this trainer's layout (special_params.json, training_args.json and <name>_lora.safetensors" \
            in message
        assert "or Eden's (special_params.json, training_args.json, <name>_embeddings.safetensors and " \
            "<name>_sdxl.safetensors, <name>_sd15.safetensors" in message
        assert f"found {found}" in message

    text = tmp_path / "weights.bin"
    text.write_text("not an archive")
    with pytest.raises(ValueError, match=r"weights.bin is not a zip file \(nor a tar archive\); expected the zip a "
                                         r"training produced, or the .tar of Eden's trainer"):
        LoraBundle.open(text, tmp_path / "work")


def test_a_recompressed_eden_tar_opens(eden_sdxl, tmp_path):
    import gzip

    packed = tmp_path / "eden_concept_eden_concept_lora_1.tar.gz"
    packed.write_bytes(gzip.compress(eden_sdxl["tar"].read_bytes()))
    bundle = LoraBundle.open(packed, tmp_path / "work")
    assert bundle.layout == "eden" and bundle.lora.name == "eden_concept_sdxl.safetensors"


def _write_safetensors(path, keys):
    from safetensors.torch import save_file

    save_file({key: torch.zeros(2, 4) for key in keys}, str(path))


def test_edens_lora_file_and_family_are_found_by_its_rules(tmp_path):
    """The kohya file wins over diffusers' own; without sd_model_version the family comes from the file name."""
    # Two rows, so two tokens, as Eden's special_params.json maps them (a map to other tokens is refused)
    (tmp_path / "special_params.json").write_text(json.dumps({"TOK": "<s0><s1>"}))
    (tmp_path / "training_args.json").write_text(json.dumps({"name": "x", "concept_mode": "object"}))
    _write_safetensors(tmp_path / "x_embeddings.safetensors", ["clip_l"])
    _write_safetensors(tmp_path / "pytorch_lora_weights.safetensors", ["unet.down_blocks.0.lora.down.weight"])
    _write_safetensors(tmp_path / "x_sd15.safetensors", ["lora_unet_down_blocks_0_attn1_to_q.lora_down.weight"])
    _write_safetensors(tmp_path / "other.safetensors", ["first_stage_model.weight"])  # not a LoRA: ignored
    bundle = LoraBundle.open(tmp_path)
    assert bundle.layout == "eden" and bundle.lora.name == "x_sd15.safetensors" and bundle.version == "sd15"
    assert bundle.tokens == ["<s0>", "<s1>"]

    (tmp_path / "x_sd15.safetensors").unlink()
    assert LoraBundle.open(tmp_path).lora.name == "pytorch_lora_weights.safetensors"
    _write_safetensors(tmp_path / "y_sdxl.safetensors", ["lora_unet_down_blocks_0_attn1_to_q.lora_down.weight"])
    _write_safetensors(tmp_path / "z_sdxl.safetensors", ["lora_unet_down_blocks_0_attn1_to_q.lora_down.weight"])
    with pytest.raises(ValueError, match=r"several LoRA files, \['y_sdxl.safetensors', 'z_sdxl.safetensors'\]"):
        LoraBundle.open(tmp_path)


# ------------------------------------------------------------------------ what Eden's files say is checked too
def _copy_eden(eden_outputs, target):
    shutil.copytree(eden_outputs["folder"], target)
    return target


def _edit_safetensors(path, change):
    from safetensors.torch import save_file

    tensors = load_file(str(path))
    change(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def _eden_lora_variant(kind):
    def change(tensors):
        key = next(k for k in sorted(tensors)
                   if k.startswith("lora_unet_down_blocks") and k.endswith(".lora_down.weight"))
        module = key[: -len(".lora_down.weight")]
        if kind == "shape":
            tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)
        elif kind == "nan":
            tensors[f"{module}.lora_up.weight"] = torch.full_like(tensors[f"{module}.lora_up.weight"], float("inf"))
        elif kind == "unknown":  # a diffusers block name this UNet does not have
            for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
                tensors[f"lora_unet_down_blocks_9_attentions_0_proj_in{suffix}"] = tensors[module + suffix].clone()
    return change


@pytest.mark.parametrize(("kind", "message"), [
    ("shape", r"this LoRA does not match the base model: lora_unet_down_blocks_\w+\.lora_down\.weight has shape "
              r".*; the layer takes"),
    ("nan", r"this LoRA does not match the base model: lora_unet_down_blocks_\w+\.lora_up\.weight holds NaN or "
            r"infinite values"),
    ("unknown", r"this LoRA does not match the base model: lora_unet_down_blocks_9_attentions_0_proj_in names no "
                r"layer of this sdxl model"),
])
def test_edens_diffusers_named_lora_that_does_not_fit_is_refused_by_name(generator, eden_sdxl, tmp_path, kind,
                                                                         message):
    folder = _copy_eden(eden_sdxl, tmp_path / "eden")
    _edit_safetensors(folder / "eden_concept_sdxl.safetensors", _eden_lora_variant(kind))
    bundle = LoraBundle.open(folder, local_paths=False)
    with pytest.raises(ValueError, match=message):
        generator.activate(bundle)
    assert generator.active is None and "<s0>" not in generator.pipeline.tokenizer.get_vocab()


@pytest.mark.parametrize(("name", "text", "message"), [
    ("training_args.json", "[1, 2]", "training_args.json must hold a JSON object, got a JSON list"),
    ("training_args.json", "[" * 100_000 + "]" * 100_000, "training_args.json is nested too deeply to read"),
    ("special_params.json", json.dumps({"TOK": "x" * 100_000}), r"maps 'TOK' to 'xxx.*\(100000 characters\)', not "
                                                                 r"to the bundle's tokens \('<s0><s1>'\)"),
    ("special_params.json", json.dumps({"TOK": "<s0><s1><s0><s1>"}), "not to the bundle's tokens"),
])
def test_edens_json_files_are_read_by_the_bundle_rules(eden_sdxl, tmp_path, name, text, message):
    folder = _copy_eden(eden_sdxl, tmp_path / "eden")
    (folder / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        LoraBundle.open(folder)


def test_edens_embedding_rows_are_capped_as_tokens(eden_sdxl, tmp_path):
    """Eden's layout adds one token per embedding row: a file of 17 rows would add more tokens than any run trains."""
    from trainer.config.schema import MAX_TOKENS

    folder = _copy_eden(eden_sdxl, tmp_path / "eden")
    _edit_safetensors(folder / "eden_concept_embeddings.safetensors",
                      lambda t: t.update({k: torch.zeros(MAX_TOKENS + 1, v.shape[1]) for k, v in t.items()}))
    with pytest.raises(ValueError, match=rf"holds {MAX_TOKENS + 1} token vectors per text encoder, more than the "
                                         rf"limit of {MAX_TOKENS}"):
        LoraBundle.open(folder)
    (folder / "eden_concept_embeddings.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=r"eden_concept_embeddings\.safetensors is not a readable \.safetensors file"):
        LoraBundle.open(folder)


def _adapted_layers(pipeline) -> dict[str, int]:
    """How many layers of each model carry the active LoRA."""
    from trainer.inference.generator import ADAPTER

    models = {"unet": pipeline.unet, "text_encoder": pipeline.text_encoder, "text_encoder_2": pipeline.text_encoder_2}
    return {name: sum(ADAPTER in getattr(module, "lora_A", {}) for module in model.modules())
            for name, model in models.items()}


def test_edens_diffusers_lora_file_gives_the_images_of_ours_and_is_checked(generator, trained_sdxl, eden_sdxl,
                                                                           tmp_path):
    """An older Eden checkpoint kept diffusers' own file: read as it is, after the same fit checks. diffusers'
    converter names the attention matrices its old way (``lora.down``) and the ResNet ``conv2`` ones peft's way
    (``lora_A``): every layer of both namings is loaded."""
    folder = _copy_eden(eden_sdxl, tmp_path / "eden")
    (folder / "eden_concept_sdxl.safetensors").unlink()
    lora = eden.write_diffusers_lora(trained_sdxl["session"], folder)
    written = load_file(str(lora))
    assert any(".conv2.lora_A." in k for k in written) and any(".to_k.lora.down." in k for k in written)
    bundle = LoraBundle.open(folder, local_paths=False)
    assert bundle.layout == "eden" and bundle.lora == lora
    ours = LoraBundle.open(trained_sdxl["result"].zip_path, tmp_path / "ours")
    generator.activate(ours)
    from_ours = _pixels(generator.generate(_request()))
    adapted = _adapted_layers(generator.pipeline)
    generator.activate(bundle)
    assert _adapted_layers(generator.pipeline) == adapted
    np.testing.assert_allclose(_pixels(generator.generate(_request())), from_ours, atol=1.0)
    generator.deactivate()

    keys = sorted(load_file(str(lora)))
    down = next(k for k in keys if k.startswith("unet.") and k.endswith("down.weight"))
    text_down = next(k for k in keys if k.startswith("text_encoder_2.") and k.endswith("down.weight"))
    for change, message in (
        (lambda t: t.update({down: torch.zeros(t[down].shape[0], t[down].shape[1] + 1)}),
         rf"{re.escape(down)} has shape .*; the layer takes"),
        (lambda t: t.update({text_down: torch.full_like(t[text_down], float("nan"))}),
         rf"{re.escape(text_down)} holds NaN or infinite values"),
        (lambda t: t.update({"unet.down_blocks.9.attentions.0.proj_in.lora.down.weight": t[down].clone()}),
         r"unet.down_blocks.9.attentions.0.proj_in names no layer of this sdxl model"),
        (lambda t: t.pop(down.replace("down.weight", "up.weight")), r"needs a down and an up matrix of one rank"),
    ):
        lora.unlink()
        eden.write_diffusers_lora(trained_sdxl["session"], folder)
        _edit_safetensors(lora, change)
        with pytest.raises(ValueError, match=f"this LoRA does not match the base model: .*{message}"):
            generator.activate(LoraBundle.open(folder, local_paths=False))
        assert generator.active is None
