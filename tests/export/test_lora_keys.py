"""Every UNet key of the exported LoRA, conv2 layers included, names the trained layer by ComfyUI's and A1111's own
key rules, and their formula applied there rebuilds the trained UNet.

The clients address a LoRA module by name, in the original (LDM/SGM) layout of the model they load:

- ComfyUI (``comfy/lora.py`` ``model_lora_keys_unet``): ``lora_unet_`` + the LDM weight path with ``_`` for ``.``,
  and ``lora_unet_`` + the diffusers path the same way (through ``comfy.utils.unet_to_diffusers``);
- A1111 (``extensions-builtin/Lora/networks.py``): ``convert_diffusers_name_to_compvis`` for diffusers-named keys
  (attention blocks part 1, ResNets part 0 with ``conv2`` → ``out_layers_3``, blocks of three), else
  ``lora_unet`` → ``diffusion_model`` for SGM-named keys (SDXL), looked up among the LDM module names.

The LDM names of the fixture's layers come from ``tests.models.ldm_format``, the tests' own converter of diffusers
folders to original checkpoints, not from the exporter under test.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

from tests.models.ldm_format import UNET_PREFIX, unet_to_ldm
from trainer.models.loading import model_cache_dir
from trainer.models.tiny import tiny_model_dir

_RESNET_SUFFIX = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
                  "conv_shortcut": "skip_connection"}


def a1111_compvis_name(key: str) -> str | None:
    """A1111's ``convert_diffusers_name_to_compvis`` (UNet part), then its SDXL fallback ``lora_unet`` →
    ``diffusion_model``; returns the module name it looks up (dots as ``_``)."""
    if m := re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        block, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        suffix = _RESNET_SUFFIX.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_input_blocks_{1 + block * 3 + index}_{1 if kind == 'attentions' else 0}_{suffix}"
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        kind, index, rest = m[1], int(m[2]), m[3]
        suffix = _RESNET_SUFFIX.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_middle_block_{1 if kind == 'attentions' else index * 2}_{suffix}"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        block, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        suffix = _RESNET_SUFFIX.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_output_blocks_{block * 3 + index}_{1 if kind == 'attentions' else 0}_{suffix}"
    return key.replace("lora_unet", "diffusion_model", 1) if key.startswith("lora_unet_") else None


def _layouts(model: str) -> tuple[dict[str, str], object]:
    """LDM module name (``diffusion_model_...``) -> diffusers module path, and a fresh UNet of the fixture."""
    import json

    from diffusers import UNet2DConditionModel

    folder = tiny_model_dir(model, model_cache_dir()) / "unet"
    unet = UNet2DConditionModel.from_pretrained(folder).eval()
    weights = {k: v for k, v in unet.state_dict().items() if k.endswith(".weight")}
    ldm = unet_to_ldm(weights, json.loads((folder / "config.json").read_text()))
    to_diffusers = dict(zip((k[len(UNET_PREFIX):-len(".weight")] for k in ldm), weights, strict=True))
    return {"diffusion_model_" + k.replace(".", "_"): v[: -len(".weight")] for k, v in to_diffusers.items()}, unet


def comfyui_key_map(ldm_to_diffusers: dict[str, str]) -> dict[str, str]:
    """ComfyUI's ``model_lora_keys_unet``: LoRA key -> diffusers module path, from both naming forms."""
    key_map = {}
    for ldm_name, path in ldm_to_diffusers.items():
        key_map["lora_unet_" + ldm_name[len("diffusion_model_"):]] = path
        key_map["lora_unet_" + path.replace(".", "_")] = path
    return key_map


def _unet_keys(lora: dict[str, torch.Tensor]) -> set[str]:
    return {k[: -len(".lora_down.weight")] for k in lora if k.startswith("lora_unet_") and k.endswith("down.weight")}


def _trained_layer_paths(session) -> dict[str, torch.nn.Module]:
    """diffusers path -> trained peft LoRA layer."""
    return {name: module for name, module in session.models.unet.named_modules() if hasattr(module, "lora_A")}


@pytest.mark.parametrize("trained_name", ["trained_sdxl", "trained_sd15"])
def test_conv2_layers_carry_lora_as_eden_trains_them(trained_name, request):
    """Eden (trainer/optimizer.py, get_unet_lora_parameters) targets to_k, to_q, to_v, to_out.0 and conv2: every
    ResNet's second convolution trains a LoRA, exported in kohya's conv form (down [r, in, 3, 3], up [out, r, 1, 1])."""
    trained = request.getfixturevalue(trained_name)
    session, result = trained["session"], trained["result"]
    _, fresh = _layouts(session.models.source.location)
    convs = {n for n, m in fresh.named_modules() if n.endswith(".conv2") and isinstance(m, torch.nn.Conv2d)}
    layers = _trained_layer_paths(session)
    assert convs and {n for n in layers if n.endswith(".conv2")} == convs
    lora = load_file(str(result.final_checkpoint / f"{result.run.name}_lora.safetensors"))
    conv_keys = [k for k in _unet_keys(lora) if lora[f"{k}.lora_down.weight"].dim() == 4]
    assert len(conv_keys) == len(convs)
    for key in conv_keys:
        down, up = lora[f"{key}.lora_down.weight"], lora[f"{key}.lora_up.weight"]
        assert down.shape[2:] == (3, 3) and up.shape[2:] == (1, 1) and down.shape[0] == up.shape[1]
    sdxl = session.models.is_sdxl
    expected = "lora_unet_input_blocks_1_0_out_layers_3" if sdxl else "lora_unet_down_blocks_0_resnets_0_conv2"
    assert expected in conv_keys


@pytest.mark.parametrize("client", ["comfyui", "a1111"])
@pytest.mark.parametrize("trained_name", ["trained_sdxl", "trained_sd15"])
def test_each_key_names_the_trained_layer_and_rebuilds_the_unet(client, trained_name, request):
    trained = request.getfixturevalue(trained_name)
    session, result = trained["session"], trained["result"]
    lora = load_file(str(result.final_checkpoint / f"{result.run.name}_lora.safetensors"))
    ldm_to_diffusers, fresh = _layouts(session.models.source.location)
    comfy = comfyui_key_map(ldm_to_diffusers)
    trained_layers = _trained_layer_paths(session)
    fresh_modules = dict(fresh.named_modules())

    keys = _unet_keys(lora)
    resolved = {}
    for key in keys:
        path = comfy.get(key) if client == "comfyui" else ldm_to_diffusers.get(a1111_compvis_name(key) or "")
        resolved[key] = path
    skipped = sorted(k for k, path in resolved.items() if path is None)
    assert not skipped, f"{client} skips {len(skipped)} keys, e.g. {skipped[:3]}"
    assert sorted(resolved.values()) == sorted(trained_layers), "each trained layer is named exactly once"

    # The client's plain-LoRA formula at the layer it resolved: W + (alpha / rank) · up @ down, conv flattened.
    with torch.no_grad():
        for key, path in resolved.items():
            layer = fresh_modules[path]
            down, up = lora[f"{key}.lora_down.weight"].float(), lora[f"{key}.lora_up.weight"].float()
            scale = float(lora[f"{key}.alpha"]) / down.shape[0]
            delta = (up.flatten(1) @ down.flatten(1)).reshape(layer.weight.shape) * scale
            layer.weight.add_(delta)
            base = trained_layers[path].get_base_layer()
            # The layer the key was trained on computes base + LoRA; the rebuilt weight must compute the same.
            conv = layer.weight.dim() == 4
            x = torch.randn((2, layer.weight.shape[1], 8, 8) if conv else (2, layer.weight.shape[1]))
            trained_out = trained_layers[path](x)
            if conv:
                rebuilt_out = torch.nn.functional.conv2d(x, layer.weight, base.bias, base.stride, base.padding)
            else:
                rebuilt_out = torch.nn.functional.linear(x, layer.weight, base.bias)
            change = (trained_out - base(x)).norm()
            # SDXL run: fp32 file (float error only); SD1.5 run: the default fp16 file.
            tolerance = 1e-4 if result.config.save_dtype == "fp32" else 5e-3
            assert (rebuilt_out - trained_out).norm() <= tolerance * change + 1e-6, f"{client}: {key}"
