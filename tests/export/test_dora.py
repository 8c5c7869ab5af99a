"""DoRA export: the dora_scale written makes ComfyUI/A1111's reconstruction equal to the trained layers."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from tests.helpers import make_concept_images, prepared_dataset, tiny_config
from trainer import loop


def comfyui_weight_decompose(weight, up, down, alpha, dora_scale):
    """ComfyUI's weight_decompose for a kohya LoRA module, output-axis case (comfy/weight_adapter/base.py)."""
    rank = down.shape[0]
    weight_calc = weight + (up @ down) * (alpha / rank)
    assert dora_scale.shape[0] == weight_calc.shape[0]  # ComfyUI picks the output axis from this shape
    weight_norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True) + torch.finfo(weight.dtype).eps
    return weight_calc * (dora_scale / weight_norm)


def test_dora_scale_reproduces_the_trained_layers_in_comfyui(tmp_path, model_cache):
    images = make_concept_images(tmp_path / "images", n=2)
    config = tiny_config(images, tmp_path / "runs", model="tiny-sd15", use_dora=True, unet_lr=2e-2, max_train_steps=4,
                         save_dtype="fp32", disable_ti=True, lora_alpha_multiplier=2.0)
    session, _ = loop.setup(config, dataset=prepared_dataset(images, tmp_path))
    result = loop.run(session, make_zip=False)
    lora = load_file(str(next(result.final_checkpoint.glob("*_lora.safetensors"))))

    checked = 0
    for name, module in session.models.unet.named_modules():
        if not getattr(module, "lora_magnitude_vector", None):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        weight = module.get_base_layer().weight.detach().float()
        rebuilt = comfyui_weight_decompose(weight, lora[f"{key}.lora_up.weight"], lora[f"{key}.lora_down.weight"],
                                           float(lora[f"{key}.alpha"]), lora[f"{key}.dora_scale"])
        x = torch.randn(3, weight.shape[1])
        with torch.no_grad():
            trained = module(x)
        bias = module.get_base_layer().bias
        expected = x @ rebuilt.T + (bias if bias is not None else 0)
        torch.testing.assert_close(expected, trained, rtol=1e-4, atol=1e-5)
        checked += 1
    assert checked > 10
    magnitudes_moved = any(
        not torch.allclose(m.lora_magnitude_vector["default"].weight,
                           m.get_base_layer().weight.norm(dim=1))
        for m in session.models.unet.modules() if getattr(m, "lora_magnitude_vector", None)
    )
    assert magnitudes_moved, "DoRA magnitudes did not train"
