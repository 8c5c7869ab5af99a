"""LoRA adapters on the UNet and the text encoders, through peft.

Frozen base weights stay in the working dtype; the adapter weights are fp32 (peft casts activations to them), so
small updates are not lost to bf16 rounding. DoRA is peft's LoRA plus input-axis magnitudes (``trainer.adapters.dora``:
the axis A1111, InvokeAI and ComfyUI rebuild).
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.adapters import dora
from trainer.adapters.fused_lora import fuse_lora_linears

ADAPTER_NAME = "default"
#: The attention projections and the second convolution of every ResNet block, as Eden's trainer targets them
#: (``get_unet_lora_parameters`` in its trainer/optimizer.py).
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv2")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def lora_config(rank: int, alpha: float, targets: tuple[str, ...]):
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets),
    )


def _upcast_trainable(module: nn.Module) -> list[nn.Parameter]:
    params = []
    for parameter in module.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.to(torch.float32)
            params.append(parameter)
    return params


def add_unet_lora(unet, rank: int, alpha: float, use_dora: bool = False) -> list[nn.Parameter]:
    """Inject LoRA (or DoRA) into the UNet's attention projections and ResNet conv2 layers; returns the new (fp32,
    trainable) parameters."""
    unet.add_adapter(lora_config(rank, alpha, UNET_TARGETS), adapter_name=ADAPTER_NAME)
    if use_dora:
        dora.add_dora(unet)
    else:
        fuse_lora_linears(unet)
    return _upcast_trainable(unet)


def add_text_encoder_lora(text_encoder, rank: int, alpha: float) -> list[nn.Parameter]:
    text_encoder.add_adapter(lora_config(rank, alpha, TEXT_ENCODER_TARGETS), adapter_name=ADAPTER_NAME)
    return [p for name, p in _named_trainable(text_encoder) if "lora_" in name]


def _named_trainable(module: nn.Module):
    for name, parameter in module.named_parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.to(torch.float32)
            yield name, parameter


def lora_state_dict(module) -> dict[str, torch.Tensor]:
    """peft's state dict of the adapter (module paths with ``lora_A``/``lora_B``), plus ``dora_scale`` for DoRA."""
    from peft.utils import get_peft_model_state_dict

    state = {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(module).items()}
    state.update(dora.magnitude_state(module))
    return state


def load_lora_state_dict(module, state: dict[str, torch.Tensor]) -> None:
    from peft.utils import set_peft_model_state_dict

    suffix = f".{dora.MAGNITUDE}"
    dora.load_magnitude_state(module, {k: v for k, v in state.items() if k.endswith(suffix)})
    state = {k: v for k, v in state.items() if not k.endswith(suffix)}
    result = set_peft_model_state_dict(module, state, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"the checkpoint's LoRA does not fit this model ({len(unexpected)} unexpected keys, "
                         f"e.g. {unexpected[0]}): lora_rank, use_dora or the base model differ")
