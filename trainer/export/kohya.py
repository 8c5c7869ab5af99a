"""peft LoRA state dicts to and from the kohya form that A1111/Forge, ComfyUI, kohya and diffusers read.

A module becomes ``<prefix>_<module path with dots as underscores>`` with ``lora_down.weight`` [r, in],
``lora_up.weight`` [out, r] and a 0-dim ``alpha``; the applied delta is up @ down × alpha / r. SD1.5 UNet modules keep
diffusers' block names (kohya's own SD1.5 convention); SDXL UNet modules use the SGM/LDM names
(``input_blocks_4_1_...``) that most SDXL LoRAs in the wild use.
"""

from __future__ import annotations

import re

import torch

UNET_PREFIX = "lora_unet"
#: The DoRA magnitudes' tensor name (LyCORIS' name, read by ComfyUI, A1111/Forge and InvokeAI).
DORA_SCALE = "dora_scale"
TE_PREFIXES = {"sd15": ("lora_te",), "sdxl": ("lora_te1", "lora_te2")}

_DOWN = re.compile(r"^down_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)$")
_UP = re.compile(r"^up_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)$")
_MID = re.compile(r"^mid_block\.(attentions|resnets)\.(\d+)\.(.+)$")
#: ResNet layers in the SGM/LDM layout (``in_layers``: norm, SiLU, conv; ``out_layers``: norm, SiLU, dropout, conv).
_RESNET_LAYERS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _resnet_layer(rest: str) -> str:
    if rest not in _RESNET_LAYERS:
        raise ValueError(f"cannot map ResNet layer {rest!r} to SGM names")
    return _RESNET_LAYERS[rest]


def diffusers_to_sgm(module_path: str, layers_per_block: int) -> str:
    """Map a diffusers UNet module path in an attention or ResNet block to its SGM name (the inverse of the mapping
    diffusers, ComfyUI and A1111 apply: in every block the ResNet is part 0 and the attention part 1)."""
    stride = layers_per_block + 1
    if match := _DOWN.match(module_path):
        block, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
        part = f"1.{rest}" if kind == "attentions" else f"0.{_resnet_layer(rest)}"
        return f"input_blocks.{block * stride + index + 1}.{part}"
    if match := _UP.match(module_path):
        block, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
        part = f"1.{rest}" if kind == "attentions" else f"0.{_resnet_layer(rest)}"
        return f"output_blocks.{block * stride + index}.{part}"
    if match := _MID.match(module_path):
        kind, index, rest = match[1], int(match[2]), match[3]
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * index}.{_resnet_layer(rest)}"
    raise ValueError(f"cannot map UNet module {module_path!r} to SGM names (only attention and ResNet blocks carry "
                     "LoRA)")


def _split_peft_key(key: str) -> tuple[str, str]:
    """'a.b.to_q.lora_A.weight' -> ('a.b.to_q', 'lora_A'); 'a.b.to_q.dora_scale' -> ('a.b.to_q', 'dora_scale')."""
    if key.endswith(f".{DORA_SCALE}"):
        return key[: -len(DORA_SCALE) - 1], DORA_SCALE
    for part in ("lora_A", "lora_B"):
        marker = f".{part}"
        if marker in key:
            return key[: key.index(marker)], part
    raise ValueError(f"not a peft LoRA key: {key!r}")


def peft_to_kohya(state: dict[str, torch.Tensor], prefix: str, alpha: float, *,
                  sgm_layers_per_block: int | None = None, dtype: torch.dtype = torch.float16,
                  text_encoder: bool = False) -> dict[str, torch.Tensor]:
    """Convert a peft adapter state dict of one model to kohya keys under ``prefix`` with the true ``alpha``.

    DoRA magnitudes are trained on the input axis (``trainer.adapters.dora``) and are the ``dora_scale`` the clients
    read as they are. They stay fp32 whatever ``dtype`` is: a trained magnitude differs from the base weight's norm
    by a small fraction, which fp16 rounding would mostly erase.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, part = _split_peft_key(key)
        if text_encoder:
            # transformers 5 dropped the ``text_model`` level from CLIPTextModel; kohya names keep it.
            name = module if module.startswith("text_model.") else f"text_model.{module}"
        elif sgm_layers_per_block is None:
            name = module
        else:
            name = diffusers_to_sgm(module, sgm_layers_per_block)
        base = f"{prefix}_{name.replace('.', '_')}"
        value = value.detach().to(torch.float32)
        if part == "lora_A":
            out[f"{base}.lora_down.weight"] = value.to(dtype).contiguous()
            out[f"{base}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
        elif part == "lora_B":
            out[f"{base}.lora_up.weight"] = value.to(dtype).contiguous()
        else:
            out[f"{base}.{DORA_SCALE}"] = value.contiguous()
    return out


def check_kohya_state(state: dict[str, torch.Tensor]) -> None:
    """Every module has down, up and alpha, shapes agree, and nothing else is in the file (diffusers' kohya loader
    raises on unknown keys; ComfyUI skips them)."""
    modules: dict[str, set[str]] = {}
    for key in state:
        module, _, suffix = key.partition(".")
        if not module.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")):
            raise ValueError(f"LoRA file holds a non-LoRA key {key!r}")
        if suffix not in ("lora_down.weight", "lora_up.weight", "alpha", DORA_SCALE):
            raise ValueError(f"LoRA file holds an unexpected tensor {key!r}")
        modules.setdefault(module, set()).add(suffix)
    for module, parts in modules.items():
        missing = {"lora_down.weight", "lora_up.weight", "alpha"} - parts
        if missing:
            raise ValueError(f"LoRA module {module} lacks {sorted(missing)}")
        down, up = state[f"{module}.lora_down.weight"], state[f"{module}.lora_up.weight"]
        if down.shape[0] != up.shape[1]:
            raise ValueError(f"LoRA module {module}: rank of down {tuple(down.shape)} and up {tuple(up.shape)} differ")
        scale = state.get(f"{module}.{DORA_SCALE}")
        # Input axis: [1, in] (linear) or [1, in, 1, 1] (conv), which every client reads per input column.
        if scale is not None and tuple(scale.shape) != (1, down.shape[1], *[1] * (down.dim() - 2)):
            raise ValueError(f"LoRA module {module}: dora_scale {tuple(scale.shape)} is not on the input axis of "
                             f"down {tuple(down.shape)}")
