"""peft's LoRA linear layer as one autograd Function on the plain path: fewer ops per layer, same results.

peft computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` through three modules: ~14 ops forward and ~18
backward per layer (transposes, views, the ``* scaling`` multiply even at scaling 1, the add and the sum of the two
input gradients), ~15k ops a step over SDXL's 560 LoRA'd attention projections. Here the frozen base and the adapter
run as one Function with a hand-written backward: the same GEMMs and FLOPs, none of the glue, and only the gradients
autograd asks for (no input gradient for cached text-encoder outputs).

The layers stay peft's (the class is a subclass swapped in place), so state dicts, exports, ``set_adapters`` scales
and DoRA see no difference; every case off the plain path (several or disabled adapters, DoRA, dropout, a trainable
or non-Linear base, hooks on the base, mixed dtypes outside autocast) takes peft's own forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _LoraLinearFunction(torch.autograd.Function):
    """``y = x Wᵀ + b + s (x Aᵀ) Bᵀ`` with ``W`` and ``b`` frozen; saves ``x`` (as 2-D) and ``h = x Aᵀ``."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale):
        x2 = x.reshape(-1, x.shape[-1])
        h = x2.mm(lora_a.t())
        out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2.mm(weight.t())
        out.addmm_(h, lora_b.t(), alpha=scale)
        ctx.save_for_backward(x2, h, weight, lora_a, lora_b)
        ctx.scale = scale
        ctx.x_shape = x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, h, weight, lora_a, lora_b = ctx.saved_tensors
        scale = ctx.scale
        g2 = grad.reshape(-1, grad.shape[-1])
        gh = g2.mm(lora_b)  # [N, r]: the gradient reaching h, before the scale
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = g2.mm(weight)
            grad_x.addmm_(gh, lora_a, alpha=scale)
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            grad_a = gh.t().mm(x2)
            if scale != 1:
                grad_a.mul_(scale)
        if ctx.needs_input_grad[4]:
            grad_b = g2.t().mm(h)
            if scale != 1:
                grad_b.mul_(scale)
        return grad_x, None, None, grad_a, grad_b, None


def _peft_linear_class() -> type:
    from peft.tuners.lora.layer import Linear

    return Linear


class _FusedLinearMixin:
    """Mixed into a subclass of peft's ``lora.Linear`` (see :func:`fuse_lora_linears`)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        fused = None if args or kwargs else self._fused_inputs(x)
        if fused is None:
            return super().forward(x, *args, **kwargs)  # type: ignore[misc]
        return _LoraLinearFunction.apply(*fused)

    def _fused_inputs(self, x: torch.Tensor):
        module: Any = self
        if module.disable_adapters or module.merged or len(module.active_adapters) != 1:
            return None
        name = module.active_adapters[0]
        if name not in module.lora_A or name in module.lora_variant:
            return None
        base, dropout = module.base_layer, module.lora_dropout[name]
        lora_a, lora_b = module.lora_A[name], module.lora_B[name]
        if (type(base) is not nn.Linear or not isinstance(dropout, nn.Identity) or base.weight.requires_grad
                or (base.bias is not None and base.bias.requires_grad) or lora_b.bias is not None
                or base._forward_hooks or base._forward_pre_hooks):
            return None
        weight: torch.Tensor = base.weight
        bias: torch.Tensor | None = base.bias
        a: torch.Tensor = lora_a.weight
        b: torch.Tensor = lora_b.weight
        if torch.is_autocast_enabled(x.device.type):
            # peft under autocast: the base and both adapter GEMMs run in the autocast dtype (the fp32 adapter
            # weights and activations cast down), the output in that dtype. Same here, with the casts outside the
            # Function so that autograd takes the gradients back to fp32.
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight, a, b = x.to(dtype), weight.to(dtype), a.to(dtype), b.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        elif not (x.dtype == weight.dtype == a.dtype == b.dtype):
            return None  # peft casts between the working and the adapter dtype: its own path
        return x, weight, bias, a, b, float(module.scaling[name])


_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (_FusedLinearMixin, cls), {})
    return _FUSED_CLASSES[cls]


def fuse_lora_linears(model: nn.Module) -> int:
    """Give every peft LoRA ``Linear`` of ``model`` the fused forward; returns how many layers changed."""
    linear = _peft_linear_class()
    count = 0
    for module in model.modules():
        if type(module) is linear:
            module.__class__ = _fused_class(linear)
            count += 1
    return count
