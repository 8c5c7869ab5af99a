"""The lean attention processor against diffusers' AttnProcessor2_0: bit-identical on SD/SDXL's layers."""

from __future__ import annotations

import copy

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from trainer.adapters.attention import LeanAttnProcessor, install_lean_processors


def _unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), cross_attention_dim=32, norm_num_groups=32, transformer_layers_per_block=(1, 2),
    )


def _forward_backward(unet, grad_context: bool):
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 7, 32, generator=generator).requires_grad_(grad_context)
    out = unet(sample, torch.tensor([10, 500]), encoder_hidden_states=context).sample
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out, context.grad, {n: p.grad for n, p in unet.named_parameters()}


def test_lean_processor_is_bit_identical_to_attnprocessor2_0():
    reference = _unet()
    reference.set_attn_processor(AttnProcessor2_0())
    lean = copy.deepcopy(reference)
    install_lean_processors(lean)
    assert {type(p) for p in lean.attn_processors.values()} == {LeanAttnProcessor}
    for grad_context in (True, False):
        reference.zero_grad(set_to_none=True)
        lean.zero_grad(set_to_none=True)
        expected, actual = _forward_backward(reference, grad_context), _forward_backward(lean, grad_context)
        assert torch.equal(actual[0], expected[0])
        assert (actual[1] is None) == (expected[1] is None) == (not grad_context)
        if grad_context:
            assert torch.equal(actual[1], expected[1])
        assert actual[2].keys() == expected[2].keys()
        for name, grad in expected[2].items():
            assert torch.equal(actual[2][name], grad), name


def test_other_layouts_take_the_general_processor():
    unet = _unet()
    attn = next(m for n, m in unet.named_modules() if n.endswith("attn2"))
    attn.rescale_output_factor = 2.0
    hidden, context = torch.randn(2, 16, attn.query_dim), torch.randn(2, 7, 32)
    mask = torch.ones(2, 7)
    for kwargs in ({}, {"attention_mask": mask}):
        expected = AttnProcessor2_0()(attn, hidden, context, **kwargs)
        assert torch.equal(LeanAttnProcessor()(attn, hidden, context, **kwargs), expected)
