"""The LoRA and embedding files' metadata, as kohya's sd-scripts writes it and A1111 and civitai read it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from tests.clients import addnet_hash, kohya_precalculated_hashes
from trainer.export import files
from trainer.export.bundle import ExportSpec, usage_readme

STABILITY_AI = "https://github.com/Stability-AI/generative-models"


def _metadata(path):
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118


def _lora_path(trained):
    result = trained["result"]
    return result.final_checkpoint / f"{result.run.name}_lora.safetensors"


def _state(rank=4, width=320, conv=False, dora=False, te=False, dtype=torch.float16):
    torch.manual_seed(0)
    state = {}
    down = (rank, width, 3, 3) if conv else (rank, width)
    up = (width, rank, 1, 1) if conv else (width, rank)
    state["lora_unet_block_proj.lora_down.weight"] = torch.randn(down).to(dtype)
    state["lora_unet_block_proj.lora_up.weight"] = torch.randn(up).to(dtype)
    state["lora_unet_block_proj.alpha"] = torch.tensor(8.0, dtype=dtype)
    if dora:
        state["lora_unet_block_proj.dora_scale"] = torch.rand(1, width, *([1, 1] if conv else []))
    if te:
        state["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.randn(8, 768).to(dtype)
        state["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.randn(768, 8).to(dtype)
        state["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha"] = torch.tensor(8.0, dtype=dtype)
    return state


def _lora_metadata(state, **overrides):
    values = {"name": "me", "version": "sdxl", "rank": 4, "alpha": 8.0, "resolution": (1024, 1024), "n_images": 3,
              "captions": ["a TOK, red"], "state": state, "base_model_name": "sdxl.safetensors",
              "trigger_tokens": "<s0><s1>"}
    values.update(overrides)
    return files.lora_metadata(**values)


@pytest.mark.parametrize("trained", ["trained_sdxl", "trained_sd15"])
def test_sshs_model_hash_is_kohyas_and_the_one_a1111_computes(trained, request):
    path = _lora_path(request.getfixturevalue(trained))
    metadata, tensors = _metadata(path)
    assert metadata["sshs_model_hash"] == addnet_hash(path.read_bytes())  # A1111: hashes.sha256(addnet)
    assert (metadata["sshs_model_hash"], metadata["sshs_legacy_hash"]) == kohya_precalculated_hashes(tensors, metadata)


def test_kohya_hashes_of_a_file_past_one_mebibyte(tmp_path):
    """The legacy hash reads 64 KiB at 1 MiB: a file that large checks it on real bytes."""
    state = _state(rank=256, width=2048)  # 2 MiB in fp16, up and down
    metadata = _lora_metadata(state)
    path = files.write_lora(tmp_path, "me", state, metadata)
    assert path.stat().st_size > 0x110000
    _, tensors = _metadata(path)
    assert metadata["sshs_model_hash"] == addnet_hash(path.read_bytes())
    assert (metadata["sshs_model_hash"], metadata["sshs_legacy_hash"]) == kohya_precalculated_hashes(tensors, metadata)
    changed = dict(state)
    changed["lora_unet_block_proj.alpha"] = torch.tensor(4.0, dtype=torch.float16)
    assert _lora_metadata(changed)["sshs_model_hash"] != metadata["sshs_model_hash"]


@pytest.mark.parametrize(("kind", "location", "name"), [
    ("hub", "stabilityai/stable-diffusion-xl-base-1.0", "stabilityai/stable-diffusion-xl-base-1.0"),
    ("tiny", "tiny-sdxl", "tiny-sdxl"),
    ("single_file", "/srv/jobs/42/models/juggernaut_v9.safetensors", "juggernaut_v9.safetensors"),
    ("single_file", "C:\\models\\dreamshaper_8.safetensors", "dreamshaper_8.safetensors"),
    ("diffusers_dir", "/data/cache/sdxl-base/", "sdxl-base"),
    ("url", "https://example.com/files/realvis.safetensors?…", "realvis.safetensors"),
])
def test_the_base_model_is_named_by_its_file_name_only(kind, location, name):
    assert files.model_name(kind, location) == name
    metadata = _lora_metadata(_state(), base_model_name=files.model_name(kind, location))
    assert metadata["ss_sd_model_name"] == name


def test_the_zip_readme_shows_no_server_path():
    spec = ExportSpec(name="me", version="sdxl", rank=4, alpha=8, te_rank=4, te_alpha=8, resolution=(64, 64),
                      n_images=2, captions=[], base_model="/srv/jobs/42/models/juggernaut_v9.safetensors",
                      token_dict={"TOK": "<s0><s1>"}, tokens=["<s0>", "<s1>"], training_args={},
                      base_model_kind="single_file")
    readme = usage_readme(spec, has_lora=True, has_embeddings=True, full_unet=False)
    assert "/srv/jobs" not in readme
    assert 'StableDiffusionXLPipeline.from_single_file("juggernaut_v9.safetensors"' in readme


def test_trained_files_name_base_model_and_implementation(trained_sdxl, trained_sd15):
    for trained, version in ((trained_sdxl, "sdxl"), (trained_sd15, "sd15")):
        metadata, _ = _metadata(_lora_path(trained))
        assert metadata["ss_sd_model_name"] == f"tiny-{version}"
        # The module names the weights use: SGM (Stability AI's code) for SDXL, diffusers' for SD1.5, as kohya.
        assert metadata["modelspec.implementation"] == (STABILITY_AI if version == "sdxl" else "diffusers")
        assert metadata["ss_network_module"] == "networks.lora"
        result = trained["result"]
        embeddings, _ = _metadata(result.final_checkpoint / f"{result.run.name}_embeddings.safetensors")
        assert embeddings["modelspec.implementation"] == STABILITY_AI
        assert embeddings["modelspec.architecture"].endswith("/textual-inversion")


def test_text_encoder_rank_and_alpha_are_stated_where_they_differ(trained_sdxl):
    metadata, _ = _metadata(_lora_path(trained_sdxl))
    args = json.loads(metadata["ss_network_args"])
    config = trained_sdxl["result"].config
    assert config.text_encoder_lora_rank != config.lora_rank
    assert args["text_encoder_dim"] == str(config.text_encoder_lora_rank)
    assert float(args["text_encoder_alpha"]) == float(trained_sdxl["session"].models.text_encoders[0]
                                                      .peft_config["default"].lora_alpha)
    assert "text-encoder LoRA rank" in metadata["ss_training_comment"]

    same = _lora_metadata(_state(te=True), te_rank=4, te_alpha=8.0)
    assert "ss_network_args" not in same
    unet_only = _lora_metadata(_state(), te_rank=16, te_alpha=16.0)
    assert "ss_network_args" not in unet_only, "no text-encoder LoRA in the file: nothing to state"


def test_dora_and_conv_files_say_so():
    metadata = _lora_metadata(_state(dora=True))
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"]) == {"algo": "lora", "dora_wd": "True"}
    assert "DoRA" in metadata["ss_training_comment"]
    conv = json.loads(_lora_metadata(_state(conv=True))["ss_network_args"])
    assert conv == {"conv_dim": "4", "conv_alpha": "8.0"}
