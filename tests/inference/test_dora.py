"""The predictor's DoRA merge refuses files whose shapes do not fit the UNet (they come from requests)."""

from __future__ import annotations

import pytest
import torch

from trainer.inference.dora import MergedDora
from trainer.models.loading import model_cache_dir
from trainer.models.tiny import tiny_model_dir


def test_a_dora_file_that_does_not_fit_the_unet_is_refused(model_cache):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir("tiny-sd15", model_cache_dir()) / "unet")
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    layer = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    out, inp = layer.weight.shape
    good = {f"{name}.lora_down.weight": torch.zeros(2, inp), f"{name}.lora_up.weight": torch.zeros(out, 2),
            f"{name}.alpha": torch.tensor(2.0), f"{name}.dora_scale": torch.ones(1, inp)}
    MergedDora(unet, "sd15", good)
    with pytest.raises(ValueError, match="not on the input axis"):
        MergedDora(unet, "sd15", {**good, f"{name}.dora_scale": torch.ones(out, 1)})
    with pytest.raises(ValueError, match="do not fit the UNet layer"):
        MergedDora(unet, "sd15", {**good, f"{name}.lora_down.weight": torch.zeros(2, inp + 1),
                                  f"{name}.dora_scale": torch.ones(1, inp + 1)})
