"""The fused LoRA linear against peft's: bit-identical on the plain path, within bf16 rounding under autocast."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from trainer.adapters.fused_lora import fuse_lora_linears


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(24, 32)
        self.to_k = nn.Linear(16, 32, bias=False)

    def forward(self, x, context):
        return self.to_q(x).sum(-1) + self.to_k(context).mean(1, keepdim=True).sum(-1)


def _pair(alpha: float = 8, dropout: float = 0.0):
    torch.manual_seed(0)
    model = _Block()
    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=8, lora_alpha=alpha, lora_dropout=dropout, target_modules=["to_q", "to_k"]),
                            model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # peft starts B at zero, which would hide the adapter's part
    fused = copy.deepcopy(model)
    assert fuse_lora_linears(fused) == 2
    return model, fused


def _run(model, x, context):
    x, context = x.clone().requires_grad_(True), context.clone().requires_grad_(True)
    out = model(x, context)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out, x.grad, context.grad, grads


def _inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(3, 5, 24, generator=generator), torch.randn(3, 7, 16, generator=generator)


@pytest.mark.parametrize("alpha", [8, 4])  # scaling 1.0 and 0.5
def test_outputs_and_gradients_are_bit_identical_to_peft(alpha):
    plain, fused = _pair(alpha)
    x, context = _inputs()
    expected, actual = _run(plain, x, context), _run(fused, x, context)
    assert torch.equal(actual[0], expected[0])
    assert torch.equal(actual[1], expected[1]) and torch.equal(actual[2], expected[2])
    assert actual[3].keys() == expected[3].keys() and len(actual[3]) == 4
    for name in expected[3]:
        assert torch.equal(actual[3][name], expected[3][name]), name
    # The fused Function ran: its node is in the graph.
    assert type(fused.to_q(x).grad_fn).__name__ == "_LoraLinearFunctionBackward"
    assert fused.state_dict().keys() == plain.state_dict().keys()


def test_no_input_gradient_is_computed_when_none_is_needed():
    _, fused = _pair()
    x, context = _inputs()
    out = fused(x, context)  # inputs without requires_grad: only the adapters get gradients
    out.sum().backward()
    assert all(p.grad is not None for n, p in fused.named_parameters() if "lora_" in n)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_under_bf16_autocast_it_matches_peft_within_bf16_rounding():
    plain, fused = _pair(4)
    x, context = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = _run(plain, x, context), _run(fused, x, context)
        layer_expected, layer_actual = plain.to_q(x), fused.to_q(x)
    reference = _run(_pair(4)[0], x, context)  # fp32: the scale of the bf16 rounding
    assert type(layer_actual.grad_fn).__name__ != "AddBackward0"
    assert layer_actual.dtype == layer_expected.dtype == torch.bfloat16
    # bf16 keeps 8 bits: each path is ~2^-8 off fp32; the two must agree to that order, not bit for bit.
    bound = 1e-2
    assert _relative(layer_actual, layer_expected) < bound
    assert _relative(actual[0], expected[0]) < bound and _relative(actual[1], expected[1]) < bound
    for name in expected[3]:
        assert actual[3][name].dtype == torch.float32  # the fp32 master weights get fp32 gradients
        assert _relative(actual[3][name], expected[3][name]) < bound, name
        assert _relative(actual[3][name], reference[3][name]) < bound, name


@pytest.mark.parametrize("case", ["dropout", "disabled", "two_adapters"])
def test_off_the_plain_path_it_is_peft(case):
    plain, fused = _pair(dropout=0.5 if case == "dropout" else 0.0)
    for model in (plain, fused):
        if case == "disabled":
            for module in model.modules():
                if hasattr(module, "enable_adapters"):
                    module.enable_adapters(False)
        if case == "two_adapters":
            inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q"]), model, adapter_name="other")
            for module in model.modules():
                if hasattr(module, "set_adapter") and "other" in getattr(module, "lora_A", {}):
                    module.set_adapter(["default", "other"])
    x, context = _inputs()
    torch.manual_seed(5)
    expected = _run(plain, x, context)
    torch.manual_seed(5)
    actual = _run(fused, x, context)
    assert torch.equal(actual[0], expected[0])
    assert type(fused.to_q(x.requires_grad_()).grad_fn).__name__ != "_LoraLinearFunctionBackward"


def test_compiles_without_graph_breaks():
    torch._dynamo.reset()
    plain, fused = _pair(4)
    x, context = _inputs()
    expected = _run(plain, x, context)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    actual = _run(compiled, x, context)
    torch.testing.assert_close(actual[0], expected[0])
    grads = {n: p.grad for n, p in fused.named_parameters() if p.requires_grad}
    assert grads.keys() == expected[3].keys()
    for name in expected[3]:
        torch.testing.assert_close(grads[name], expected[3][name], msg=name)


def test_compiles_without_graph_breaks_under_bf16_autocast():
    # The GPU default: bf16 autocast with regional compilation.
    torch._dynamo.reset()
    plain, fused = _pair(4)
    x, context = _inputs()
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual, expected = _run(compiled, x, context), _run(plain, x, context)
    assert actual[0].dtype == torch.bfloat16
    assert _relative(actual[0], expected[0]) < 1e-2
