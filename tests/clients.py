"""How ComfyUI, A1111/Forge, InvokeAI, kohya and diffusers read our files, rewritten from their source for the tests.

Each function follows one client's released code (named in its docstring), in our own words, so that a test checks
a file by that client's rules rather than by ours. Computation is in fp32: the clients' own compute precision is
theirs, what is checked here is the file.
"""

from __future__ import annotations

import hashlib
import io

import torch

# ------------------------------------------------------------------------------------------------ LoRA / DoRA


def _module_tensors(state: dict[str, torch.Tensor], module: str) -> dict[str, torch.Tensor]:
    prefix = f"{module}."
    return {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}


def comfyui_patched_weight(weight: torch.Tensor, state: dict[str, torch.Tensor], module: str,
                           strength: float = 1.0) -> torch.Tensor:
    """ComfyUI ``comfy/weight_adapter/lora.py`` ``LoRAAdapter.calculate_weight`` with ``base.py`` ``weight_decompose``.

    alpha / rank scales up @ down first; with a ``dora_scale`` the axis follows its shape (output axis when its first
    dimension equals the weight's, then divided by the norm of the *original* rows; else per input column of the
    merged weight), an fp eps is added to the norm, and a strength other than 1 blends W + s (W' - W).
    """
    t = _module_tensors(state, module)
    weight = weight.float().clone()
    up, down = t["lora_up.weight"], t["lora_down.weight"]
    alpha = float(t["alpha"]) / down.shape[0] if "alpha" in t else 1.0
    diff = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    if "dora_scale" not in t:
        return weight + strength * alpha * diff
    dora_scale = t["dora_scale"]
    calc = weight + diff * alpha
    if dora_scale.shape[0] == calc.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1)
    norm = norm + torch.finfo(weight.dtype).eps
    calc = calc * (dora_scale / norm)
    if strength != 1.0:
        return weight + strength * (calc - weight)
    return calc


def a1111_patched_weight(weight: torch.Tensor, state: dict[str, torch.Tensor], module: str,
                         multiplier: float = 1.0) -> torch.Tensor:
    """A1111 ``extensions-builtin/Lora``: ``network_lora.py`` ``calc_updown`` and ``network.py`` ``finalize_updown``.

    up and down are flattened and multiplied, reshaped to the weight, scaled by alpha / dim; with a ``dora_scale``,
    ``apply_weight_decompose`` always normalises per input column of W + updown (no eps) and returns the new weight
    minus W; the multiplier scales the result, which is added to W.
    """
    t = _module_tensors(state, module)
    weight = weight.float()
    up, down = t["lora_up.weight"], t["lora_down.weight"]
    dim = down.shape[0]
    updown = (up.reshape(up.shape[0], -1) @ down.reshape(dim, -1)).reshape(weight.shape)
    scale = float(t["alpha"]) / dim if "alpha" in t else 1.0
    updown = updown * scale
    if "dora_scale" in t:
        norm_dims = weight.dim() - 1
        merged = updown + weight
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(merged.shape[1], *[1] * norm_dims).transpose(0, 1)
        updown = merged * (t["dora_scale"] / norm) - weight
    return weight + updown * multiplier


def invokeai_patched_weight(weight: torch.Tensor, state: dict[str, torch.Tensor], module: str,
                            weight_factor: float = 1.0) -> torch.Tensor:
    """InvokeAI ``invokeai/backend/patches/layers``: ``utils.py`` sends any module with ``dora_scale`` to
    ``dora_layer.py`` ``DoRALayer`` (else ``LoRALayer``); the layer patcher adds ``get_parameters`` to the weight.

    DoRA: ΔV = up @ down × alpha/rank, W' = (W + ΔV) · dora_scale / ‖W + ΔV‖ per input column, patch (W' - W) ×
    weight. Plain LoRA: (up @ down) × alpha/rank × weight.
    """
    t = _module_tensors(state, module)
    weight = weight.float()
    up, down = t["lora_up.weight"], t["lora_down.weight"]
    scale = float(t["alpha"]) / down.shape[0] if "alpha" in t else 1.0
    delta = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(weight.shape) * scale
    if "dora_scale" not in t:
        return weight + delta * weight_factor
    out = weight + delta
    norm = out.transpose(0, 1).reshape(out.shape[1], -1).norm(dim=1, keepdim=True)
    norm = norm.reshape(out.shape[1], *[1] * (out.dim() - 1)).transpose(0, 1)
    out = out * (t["dora_scale"] / norm)
    return weight + (out - weight) * weight_factor


CLIENT_WEIGHTS = {"comfyui": comfyui_patched_weight, "a1111": a1111_patched_weight,
                  "invokeai": invokeai_patched_weight}


# ------------------------------------------------------------------------------------------------ embeddings


def a1111_embedding(data: dict[str, torch.Tensor], expected_width: int | None) -> torch.Tensor | dict | None:
    """A1111 ``modules/textual_inversion/textual_inversion.py`` ``create_embedding_from_data`` and the
    ``expected_shape`` check of ``load_from_file``: ``string_to_param``; a dict with both ``clip_g`` and ``clip_l``
    (SDXL, width clip_g + clip_l); any other dict must hold exactly one tensor (a 1-D vector becomes one row).
    An embedding whose width is not the model's is skipped (None)."""
    if "string_to_param" in data:
        vec = next(iter(data["string_to_param"].values()))
        width = vec.shape[-1]
    elif "clip_g" in data and "clip_l" in data:
        vec = {k: v.float() for k, v in data.items()}
        width = data["clip_g"].shape[-1] + data["clip_l"].shape[-1]
    else:
        if len(data) != 1:
            raise AssertionError("embedding file has multiple terms in it")
        vec = next(iter(data.values()))
        vec = vec.unsqueeze(0) if vec.dim() == 1 else vec
        width = vec.shape[-1]
    if expected_width is not None and width != expected_width:
        return None
    return vec


def comfyui_embedding(data: dict[str, torch.Tensor], embed_key: str, embedding_size: int) -> torch.Tensor | None:
    """ComfyUI ``comfy/sd1_clip.py`` ``load_embed``: ``string_to_param``, else the tokenizer's own key (``clip_l`` for
    SD1.5 and SDXL's CLIP-L, ``clip_g`` for CLIP-G) when present, else the first tensor. At encoding time a vector
    whose width is not the encoder's is ignored with a warning (None here)."""
    if "string_to_param" in data:
        out = next(iter(data["string_to_param"].values()))
    elif embed_key in data:
        out = data[embed_key]
    else:
        out = next(iter(data.values()))
    out = out.unsqueeze(0) if out.dim() == 1 else out
    return out if out.shape[-1] == embedding_size else None


def invokeai_embedding_base(data: dict[str, torch.Tensor]) -> str:
    """InvokeAI ``invokeai/backend/model_manager/configs/textual_inversion.py``: the probe that decides what an
    embedding file is for. It must look like an embedding (``string_to_param``, ``emb_params`` or ``clip_g`` key, or a
    small all-tensor dict); the token width comes from ``string_to_param`` / ``emb_params`` / ``clip_g`` (last dim),
    else from ``shape[0]`` of the first tensor; 768 is SD1, 1024 SD2, 1280 SDXL, anything else no match."""
    looks = any(k in {"string_to_param", "emb_params", "clip_g"} for k in data) or (
        len(data) < 10 and all(isinstance(v, torch.Tensor) for v in data.values()))
    if not looks:
        return "unknown"
    if "string_to_token" in data:
        width = next(iter(data["string_to_param"].values())).shape[-1]
    elif "emb_params" in data:
        width = data["emb_params"].shape[-1]
    elif "clip_g" in data:
        width = data["clip_g"].shape[-1]
    else:
        width = next(iter(data.values())).shape[0]
    return {768: "sd-1", 1024: "sd-2", 1280: "sdxl"}.get(width, "unknown")


def invokeai_embedding(data: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """InvokeAI ``invokeai/backend/textual_inversion.py`` ``TextualInversionModelRaw.from_checkpoint``: the vectors
    it uses, (embedding, embedding_2): ``string_to_param``, ``emb_params``, SDXL ``clip_g`` + ``clip_l``, else the
    first tensor."""
    if "string_to_param" in data:
        return next(iter(data["string_to_param"].values())), None
    if "emb_params" in data:
        return data["emb_params"], None
    if "clip_g" in data and "clip_l" in data:
        return data["clip_g"], data["clip_l"]
    first = next(iter(data.values()))
    return (first.unsqueeze(0) if first.dim() == 1 else first), None


# ------------------------------------------------------------------------------------------------ hashes


def addnet_hash(data: bytes) -> str:
    """kohya ``library/train_util.py`` ``addnet_hash_safetensors`` (A1111's ``hashes.sha256(...,
    use_addnet_hash=True)``): sha256 of everything after the safetensors header."""
    header = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header:]).hexdigest()


def addnet_legacy_hash(data: bytes) -> str:
    """kohya ``addnet_hash_legacy``: sha256 of 64 KiB at offset 1 MiB, first 8 hex digits."""
    return hashlib.sha256(data[0x100000:0x100000 + 0x10000]).hexdigest()[:8]


def kohya_precalculated_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """kohya ``precalculate_safetensors_hashes``: the two hashes of the file as saved with only its ``ss_*``
    metadata (what kohya writes as ``sshs_model_hash`` / ``sshs_legacy_hash``)."""
    import safetensors.torch

    training = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = safetensors.torch.save(tensors, training)
    return addnet_hash(data), addnet_legacy_hash(io.BytesIO(data).getvalue())
