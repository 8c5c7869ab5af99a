"""LoRA adapters on the UNet and the text encoders, through peft.

Frozen base weights stay in the working dtype; the adapter weights are fp32 (peft casts activations to them), so
small updates are not lost to bf16 rounding.
"""

from __future__ import annotations

import torch
from torch import nn

ADAPTER_NAME = "default"
#: The attention projections and the second convolution of every ResNet block, as Eden's trainer targets them
#: (``get_unet_lora_parameters`` in its trainer/optimizer.py).
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv2")
#: DoRA's targets. Eden's DoRA covers conv2 as well; here the DoRA export handles linear layers only so far.
UNET_DORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def lora_config(rank: int, alpha: float, targets: tuple[str, ...], use_dora: bool = False):
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets),
        use_dora=use_dora,
    )


def _upcast_trainable(module: nn.Module) -> list[nn.Parameter]:
    params = []
    for parameter in module.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.to(torch.float32)
            params.append(parameter)
    return params


def add_unet_lora(unet, rank: int, alpha: float, use_dora: bool = False) -> list[nn.Parameter]:
    """Inject LoRA into the UNet's attention projections and ResNet conv2 layers; returns the new (fp32, trainable)
    parameters."""
    targets = UNET_DORA_TARGETS if use_dora else UNET_TARGETS
    unet.add_adapter(lora_config(rank, alpha, targets, use_dora), adapter_name=ADAPTER_NAME)
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
    """peft's state dict of the adapter (module paths with ``lora_A``/``lora_B``/``lora_magnitude_vector``)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(module).items()}


def load_lora_state_dict(module, state: dict[str, torch.Tensor]) -> None:
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(module, state, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"the checkpoint's LoRA does not fit this model ({len(unexpected)} unexpected keys, "
                         f"e.g. {unexpected[0]}): lora_rank, use_dora or the base model differ")


@torch.no_grad()
def dora_scales_for_export(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per DoRA module, the ``dora_scale`` [out, 1] that ComfyUI and A1111 need to rebuild the trained weight.

    peft computes W' = m · (W + ΔW) / ‖W + ΔW‖ (row norms). Readers of kohya/LyCORIS files that decompose on the
    output axis compute W' = (W + ΔW) · dora_scale / ‖W‖, with the norm of the *original* weight, so the file must
    carry m · ‖W‖ / ‖W + ΔW‖ for the two to agree.
    """
    scales = {}
    for name, module in model.named_modules():
        magnitudes = getattr(module, "lora_magnitude_vector", None)
        if not magnitudes or ADAPTER_NAME not in magnitudes:
            continue
        weight = module.get_base_layer().weight.float()
        lora_a = module.lora_A[ADAPTER_NAME].weight.float()
        lora_b = module.lora_B[ADAPTER_NAME].weight.float()
        delta = (lora_b @ lora_a) * module.scaling[ADAPTER_NAME]
        magnitude = magnitudes[ADAPTER_NAME].weight.float().reshape(-1, 1)
        base_norm = weight.norm(dim=1, keepdim=True)
        new_norm = (weight + delta).norm(dim=1, keepdim=True)
        scales[name] = (magnitude * base_norm / new_norm).cpu()
    return scales


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in module.named_parameters() if "lora_" in name]
