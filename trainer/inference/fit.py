"""Whether a LoRA bundle's tensors fit the base model, checked before any of them is loaded.

A LoRA zip may come from anyone. diffusers and peft, given a file that does not fit, fail deep inside with messages
such as ``invalid literal for int() with base 10: 'input'`` or a bare size-mismatch ``RuntimeError``; a file of NaNs
loads and renders flat grey images. So every module a LoRA names must exist in the base model under one of the names
kohya files use (diffusers' block names, or SGM names for SDXL UNets), with shapes that fit its weight, and every
tensor must be finite. diffusers' own LoRA layout (older Eden checkpoints) is checked the same way by module path.
The same holds for token vectors and for a full UNet's configuration. Failures read
"this LoRA does not match the base model: ...".
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from trainer.config.schema import MAX_RANK
from trainer.data.ingest.safety import printable
from trainer.export.kohya import DORA_SCALE, TE_PREFIXES, UNET_PREFIX, check_kohya_state, diffusers_to_sgm

MISMATCH = "this LoRA does not match the base model"
#: UNet configuration keys that may differ between a full fine-tune and its base (bookkeeping, not architecture).
_UNET_BOOKKEEPING = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}


class LoraMismatch(ValueError):
    """A bundle whose tensors or configuration do not fit the loaded base model."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"{MISMATCH}: {detail}")


def _layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Linear and convolution layers by path; a layer that carries an adapter already (peft wraps it, keeping the
    original as ``base_layer``) is listed under its own path, and the adapter's matrices are not layers of the
    model."""
    layers = {}
    for path, layer in module.named_modules():
        if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        parts = path.split(".")
        if any(part.startswith(("lora_A", "lora_B", "lora_magnitude")) for part in parts):
            continue
        layers[path.removesuffix(".base_layer")] = layer
    return layers


def kohya_modules(pipeline, version: str) -> dict[str, torch.nn.Module]:
    """kohya name -> layer, for every linear and convolution layer a LoRA may adapt."""
    names: dict[str, torch.nn.Module] = {}
    layers_per_block = pipeline.unet.config.layers_per_block if version == "sdxl" else None
    for path, layer in _layers(pipeline.unet).items():
        names[f"{UNET_PREFIX}_{path.replace('.', '_')}"] = layer
        if isinstance(layers_per_block, int):
            with contextlib.suppress(ValueError):  # only attention blocks have SGM names
                names[f"{UNET_PREFIX}_{diffusers_to_sgm(path, layers_per_block).replace('.', '_')}"] = layer
    encoders = [pipeline.text_encoder] + ([pipeline.text_encoder_2] if version == "sdxl" else [])
    for prefix, encoder in zip(TE_PREFIXES[version], encoders, strict=True):
        for path, layer in _layers(encoder).items():
            full = path if path.startswith("text_model.") else f"text_model.{path}"
            names[f"{prefix}_{full.replace('.', '_')}"] = layer
    return names


def check_lora_state(state: dict[str, torch.Tensor], pipeline, version: str) -> None:
    """Raise :class:`LoraMismatch` unless every tensor of the kohya ``state`` fits a layer of ``pipeline``.

    Both kohya namings are read: ours (SGM block names for the SDXL UNet) and Eden's (diffusers' block names).
    """
    try:
        check_kohya_state(state)
    except ValueError as error:
        raise LoraMismatch(_shown(str(error), 300)) from None
    modules = kohya_modules(pipeline, version)
    for key, tensor in state.items():
        module, _, part = key.partition(".")
        layer = modules.get(module)
        if layer is None:
            raise LoraMismatch(f"{_shown(module)} names no layer of this {version} model")
        _check_part(key, _KOHYA_PARTS[part], tensor, layer.weight)


#: kohya's tensor names per module, and what each is.
_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", DORA_SCALE: DORA_SCALE}
#: diffusers' own LoRA file (``pytorch_lora_weights.safetensors``, kept by older Eden checkpoints):
#: ``<component>.<module path>.<part>``, in the part names diffusers and peft have used.
_DIFFUSERS_PARTS = {"lora.down.weight": "down", "lora.up.weight": "up", "lora_linear_layer.down.weight": "down",
                    "lora_linear_layer.up.weight": "up", "lora_A.weight": "down", "lora_B.weight": "up",
                    "alpha": "alpha"}
DIFFUSERS_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
#: diffusers' older names of the LoRA matrices, and peft's, which its loader reads.
_PEFT_NAMES = {"lora.down.weight": "lora_A.weight", "lora.up.weight": "lora_B.weight",
               "lora_linear_layer.down.weight": "lora_A.weight", "lora_linear_layer.up.weight": "lora_B.weight"}


def is_diffusers_lora(state: dict[str, torch.Tensor]) -> bool:
    """Keys in diffusers' own layout (``unet.down_blocks...``, ``text_encoder.text_model...``), not kohya's."""
    return bool(state) and all(key.split(".", 1)[0] in DIFFUSERS_COMPONENTS for key in state)


def diffusers_lora_as_peft(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers-layout LoRA with every matrix under peft's names (``lora_A``/``lora_B``).

    diffusers' ``convert_state_dict_to_diffusers`` renames only the layers it has a mapping for (attention
    projections) and leaves the others (ResNet ``conv2``) under peft's names, so Eden's chain writes files with both
    namings. diffusers' loader takes such a file as peft-named and silently skips every layer under the older names.
    """
    renamed = {}
    for key, tensor in state.items():
        old = next((name for name in _PEFT_NAMES if key.endswith(f".{name}")), None)
        renamed[key[: -len(old)] + _PEFT_NAMES[old] if old else key] = tensor
    return renamed


def check_diffusers_lora_state(state: dict[str, torch.Tensor], pipeline, version: str) -> None:
    """:func:`check_lora_state` for a LoRA file in diffusers' own layout: every tensor names a layer of
    ``pipeline`` by its module path, fits its weight and is finite; each module has both matrices, of one rank."""
    components = {"unet": pipeline.unet, "text_encoder": pipeline.text_encoder}
    if version == "sdxl":
        components["text_encoder_2"] = pipeline.text_encoder_2
    # transformers 5 dropped CLIPTextModel's ``text_model`` level, which files written before it still name
    layers = {name: {path.removeprefix("text_model."): layer for path, layer in _layers(module).items()}
              for name, module in components.items()}
    ranks: dict[str, dict[str, int]] = {}
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
        part = next((p for p in _DIFFUSERS_PARTS if rest.endswith(f".{p}")), None)
        if component not in layers or part is None:
            raise LoraMismatch(f"{_shown(key)} is not a LoRA tensor of this {version} model")
        module = rest[: -len(part) - 1]
        layer = layers[component].get(module.removeprefix("text_model."))
        if layer is None:
            raise LoraMismatch(f"{_shown(component + '.' + module)} names no layer of this {version} model")
        kind = _DIFFUSERS_PARTS[part]
        _check_part(key, kind, tensor, layer.weight)
        if kind in ("down", "up"):
            ranks.setdefault(f"{component}.{module}", {})[kind] = tensor.shape[0 if kind == "down" else 1]
    for module, found in ranks.items():
        if set(found) != {"down", "up"} or found["down"] != found["up"]:
            raise LoraMismatch(f"{_shown(module)} needs a down and an up matrix of one rank, has {found}")


def _check_part(key: str, kind: str, tensor: torch.Tensor, weight: torch.Tensor) -> None:
    """One LoRA tensor (``kind``: down, up, alpha or dora_scale) against the weight of the layer it adapts."""
    if not torch.isfinite(tensor).all():
        raise LoraMismatch(f"{_shown(key)} holds NaN or infinite values")
    if kind != "alpha" and not tensor.is_floating_point():  # diffusers' kohya conversion stores alpha as an int
        raise LoraMismatch(f"{_shown(key)} holds {tensor.dtype} values, not floating point")
    shape = tuple(tensor.shape)
    if kind == "down":
        # [rank, inputs] (linear) or [rank, inputs, kh, kw] with the layer's own kernel (convolution)
        if tensor.dim() != weight.dim() or shape[0] > MAX_RANK or tensor.shape[1:] != weight.shape[1:]:
            raise LoraMismatch(f"{_shown(key)} has shape {shape}; the layer takes {weight.shape[1]} inputs "
                               f"(weight {tuple(weight.shape)}, rank at most {MAX_RANK})")
    elif kind == "up":
        # [outputs, rank], or [outputs, rank, 1, 1] for a convolution
        if tensor.dim() != weight.dim() or shape[0] != weight.shape[0] or tensor.shape[2:].numel() != 1:
            raise LoraMismatch(f"{_shown(key)} has shape {shape}; the layer gives {weight.shape[0]} outputs")
    elif kind == "alpha":
        if tensor.numel() != 1:
            raise LoraMismatch(f"{_shown(key)} must be one number, has shape {shape}")
    elif kind == DORA_SCALE:
        # One magnitude per input column, the axis A1111, InvokeAI and ComfyUI read (trainer.adapters.dora).
        wanted = (1, weight.shape[1], *[1] * (weight.dim() - 2))
        if shape != wanted:
            raise LoraMismatch(f"{_shown(key)} has shape {shape}; the layer takes {wanted} (one magnitude per input)")


def _shown(text: str, limit: int = 160) -> str:
    """A name from a stranger's file, printable and short enough for a message."""
    text = printable(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_token_vectors(vectors: dict[str, torch.Tensor], expected: dict[str, int], n_tokens: int, name: str) -> None:
    """Each encoder's vectors: [n_tokens, width of that encoder], finite."""
    for key, width in expected.items():
        tensor = vectors.get(key)
        if tensor is None:
            raise LoraMismatch(f"{name} has no {key!r} vectors")
        if tuple(tensor.shape) != (n_tokens, width):
            raise LoraMismatch(f"{name}: {key} has shape {tuple(tensor.shape)}, expected ({n_tokens}, {width}) for "
                               f"{n_tokens} tokens")
        if not torch.isfinite(tensor).all():
            raise LoraMismatch(f"{name}: {key} holds NaN or infinite values")


def check_unet_config(folder: Path, base_config) -> None:
    """A full UNet's architecture must be the base model's (its config could otherwise ask for any size)."""
    path = Path(folder) / "config.json"
    if path.stat().st_size > 1 << 20:
        raise LoraMismatch("unet/config.json is larger than 1 MiB")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError, UnicodeDecodeError):
        raise LoraMismatch("unet/config.json is not valid JSON") from None
    if not isinstance(config, dict):
        raise LoraMismatch("unet/config.json must hold a JSON object")
    base = {k: v for k, v in dict(base_config).items() if k not in _UNET_BOOKKEEPING}
    for key, value in config.items():
        if key in _UNET_BOOKKEEPING or key not in base:
            continue
        wanted = base[key]
        if _normalised(value) != _normalised(wanted):
            raise LoraMismatch(f"unet/config.json sets {key} to {str(value)[:80]}, the base model has {wanted}")


def _normalised(value):
    return list(value) if isinstance(value, (list, tuple)) else value
