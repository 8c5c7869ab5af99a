"""DoRA (weight-decomposed LoRA, arXiv 2402.09353) on the input axis, over peft's LoRA layers.

DoRA gives every slice of the merged weight W + ΔW a trained magnitude. peft normalises per output row; A1111,
InvokeAI and ComfyUI (and the Forge backends built on ComfyUI's code) rebuild a kohya/LyCORIS ``dora_scale`` per input
column: W' = (W + ΔW) · m / ‖W + ΔW‖_col, with ‖·‖_col the norm over everything but the input channel. The two are
different functions, so a peft DoRA cannot be written as a file those clients rebuild exactly. Trained here on the
input axis instead, the magnitude ``m`` *is* the file's ``dora_scale`` (shape ``[1, in]`` for linear layers,
``[1, in, 1, 1]`` for convolutions) and every client reproduces the trained layer.

Scaling input column i of the weight is scaling input channel i of the activation, so the layer computes
``lora_layer(x · g)`` with ``g = m / ‖W + ΔW‖_col``: one pass through the base layer, as plain LoRA. The norm is
treated as a constant in the backward pass (the paper's section 4.3, as peft does), which saves keeping ΔW for it.

A LoRA scale s other than 1 (diffusers' ``cross_attention_kwargs={"scale": s}``) blends the base and the DoRA layer,
W + s · (W' − W), as the LoRA strength does in ComfyUI, A1111 and InvokeAI.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

ADAPTER_NAME = "default"
#: Attribute of a peft LoRA layer holding its magnitudes, and the state-dict key suffix (the kohya tensor name).
MAGNITUDE = "dora_scale"


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "get_base_layer") and ADAPTER_NAME in module.lora_A


def _check_supported(name: str, base: nn.Module) -> None:
    if isinstance(base, nn.Conv2d):
        if base.groups != 1:
            raise ValueError(f"DoRA on {name}: grouped convolutions (groups={base.groups}) are not supported")
    elif not isinstance(base, nn.Linear):
        raise ValueError(f"DoRA on {name}: only Linear and Conv2d layers are supported, got {type(base).__name__}")


def lora_delta(module: nn.Module) -> torch.Tensor:
    """ΔW = B·A at the trained LoRA scale (alpha / rank), in fp32 and in the shape of the base weight."""
    weight = module.get_base_layer().weight
    down = module.lora_A[ADAPTER_NAME].weight.float()
    up = module.lora_B[ADAPTER_NAME].weight.float()
    delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    return delta * trained_scaling(module)


def trained_scaling(module: nn.Module) -> float:
    return module.lora_alpha[ADAPTER_NAME] / module.r[ADAPTER_NAME]


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """Norm over everything but the input channel, shaped to broadcast against the weight and the activations:
    ``[1, in]`` for ``[out, in]``, ``[1, in, 1, 1]`` for ``[out, in, kh, kw]``."""
    norms = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    return norms.reshape(1, weight.shape[1], *[1] * (weight.dim() - 2))


def merged_weight(module: nn.Module) -> torch.Tensor:
    """The trained layer's weight W' = (W + ΔW) · m / ‖W + ΔW‖_col, in fp32."""
    combined = module.get_base_layer().weight.float() + lora_delta(module)
    magnitude = getattr(module, MAGNITUDE)[ADAPTER_NAME].float()
    return combined * (magnitude / column_norms(combined))


def _input_gain(module: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        norms = column_norms(module.get_base_layer().weight.float() + lora_delta(module))
    return getattr(module, MAGNITUDE)[ADAPTER_NAME] / norms


def _dora_forward(module: nn.Module, peft_forward, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if (module.disable_adapters or module.merged or ADAPTER_NAME not in module.active_adapters
            or kwargs.get("adapter_names") is not None):
        return peft_forward(x, *args, **kwargs)
    base = module.get_base_layer()
    lora_a, lora_b = module.lora_A[ADAPTER_NAME], module.lora_B[ADAPTER_NAME]
    scaled = x * _input_gain(module)
    if not torch.is_autocast_enabled(x.device.type):
        scaled = scaled.to(x.dtype)  # the frozen base weight keeps the working dtype, as the activations do
    result = base(scaled, *args, **kwargs)
    result_dtype = result.dtype
    lora_in = module.lora_dropout[ADAPTER_NAME](scaled.to(lora_a.weight.dtype))
    result = result + lora_b(lora_a(lora_in)) * trained_scaling(module)
    strength = module.scaling[ADAPTER_NAME] / trained_scaling(module)
    if strength != 1.0:
        # W + s (W' - W), with the bias once: s (W'x + b) + (1 - s) (Wx + b).
        result = strength * result + (1.0 - strength) * base(x, *args, **kwargs)
    return result.to(result_dtype)


def add_dora(model: nn.Module) -> list[nn.Parameter]:
    """Turn every peft LoRA layer of ``model`` into an input-axis DoRA layer; returns the new magnitudes (fp32).

    The magnitudes start at the column norms of the base weight, so the layer starts as the base layer.
    """
    magnitudes = []
    for name, module in model.named_modules():
        if not _is_lora_layer(module) or hasattr(module, MAGNITUDE):
            continue
        base = module.get_base_layer()
        _check_supported(name, base)
        initial = column_norms(base.weight.detach().float())
        parameter = nn.Parameter(initial.to(base.weight.device))
        setattr(module, MAGNITUDE, nn.ParameterDict({ADAPTER_NAME: parameter}))
        module.forward = functools.partial(_dora_forward, module, module.forward)
        magnitudes.append(parameter)
    if not magnitudes:
        raise ValueError("add_dora found no LoRA layers: add the LoRA adapter first")
    return magnitudes


def dora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> the DoRA layers of ``model`` (peft LoRA layers with magnitudes)."""
    return {name: module for name, module in model.named_modules() if _is_lora_layer(module)
            and hasattr(module, MAGNITUDE)}


def magnitude_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``<module path>.dora_scale`` -> the magnitudes, as in peft's state-dict naming."""
    return {f"{name}.{MAGNITUDE}": getattr(module, MAGNITUDE)[ADAPTER_NAME].detach().float().cpu().clone()
            for name, module in dora_layers(model).items()}


def load_magnitude_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    layers = dora_layers(model)
    expected = {f"{name}.{MAGNITUDE}" for name in layers}
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"the checkpoint's DoRA magnitudes do not fit this model (missing {missing[:1]}, "
                         f"unexpected {unexpected[:1]}): use_dora or the base model differ")
    with torch.no_grad():
        for name, module in layers.items():
            parameter = getattr(module, MAGNITUDE)[ADAPTER_NAME]
            value = state[f"{name}.{MAGNITUDE}"]
            if value.shape != parameter.shape:
                raise ValueError(f"DoRA magnitude of {name} has shape {tuple(value.shape)}, expected "
                                 f"{tuple(parameter.shape)}")
            parameter.copy_(value.to(parameter.device, parameter.dtype))
