"""Writing the trained artefacts: the kohya LoRA, the embeddings, ``special_params.json`` and their metadata.

These files are what every consumer reads (ComfyUI, A1111/Forge, diffusers, our predictor), so they are written
the same way into every checkpoint folder and into the delivered zip.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import torch
from safetensors.torch import save_file

from trainer.export.kohya import DORA_SCALE, TE_PREFIXES, UNET_PREFIX, check_kohya_state
from trainer.utils.atomic import atomic_path, atomic_write_text

LORA_SUFFIX = "_lora.safetensors"
EMBEDDINGS_SUFFIX = "_embeddings.safetensors"
SPECIAL_PARAMS = "special_params.json"
TRAINING_ARGS = "training_args.json"
FULL_UNET_DIR = "unet"

BASE_MODEL_VERSION = {"sdxl": "sdxl_base_v1-0", "sd15": "sd_v1"}
ARCHITECTURE = {"sdxl": "stable-diffusion-xl-v1-base", "sd15": "stable-diffusion-v1"}
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
#: ``modelspec.implementation``: the code whose module names the weights use, as kohya's sd-scripts writes it. The
#: SDXL LoRA uses Stability AI's SGM names, the SD1.5 LoRA diffusers' names; embeddings are plain CLIP vectors.
STABILITY_AI_CODE = "https://github.com/Stability-AI/generative-models"
LORA_IMPLEMENTATION = {"sdxl": STABILITY_AI_CODE, "sd15": "diffusers"}
TE_KEY_PREFIXES = tuple(f"{p}_" for prefixes in TE_PREFIXES.values() for p in prefixes)


def safe_name(name: str) -> str:
    """A file-name-safe version of the run name (A1111/ComfyUI use the embedding's file name as its trigger)."""
    cleaned = "".join(c if c.isalnum() or c in "-_" else "_" for c in name.strip())
    return cleaned.strip("_") or "lora"


def kohya_hashes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """``sshs_model_hash`` and ``sshs_legacy_hash`` as kohya's sd-scripts compute them.

    The model hash is the sha256 of the safetensors data section (everything after the header), which is also what
    A1111 computes from the file itself (its "addnet" hash) and what civitai shows; the legacy hash covers 64 KiB at
    1 MiB of the file as saved with only its ``ss_*`` metadata.
    """
    from safetensors.torch import save

    training = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = save({k: v.contiguous() for k, v in state.items()}, training)
    header = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash


def model_name(kind: str, location: str) -> str:
    """The base model as kohya names it in ``ss_sd_model_name``: a hub id as it is, else the file or folder name
    only (never the server's path, nor a URL's host or query)."""
    if kind in ("hub", "tiny"):
        return location
    if kind == "url":
        location = urlsplit(location).path
    return PurePosixPath(location.replace("\\", "/")).name or location


def tag_frequency(captions: list[str]) -> dict[str, dict[str, int]]:
    counts = Counter(tag.strip() for caption in captions for tag in caption.split(",") if tag.strip())
    return {"img": dict(counts.most_common(200))}


def lora_metadata(*, name: str, version: str, rank: int, alpha: float, resolution: tuple[int, int],
                  n_images: int, captions: list[str], state: dict[str, torch.Tensor], base_model_name: str,
                  trigger_tokens: str, te_rank: int | None = None, te_alpha: float | None = None) -> dict[str, str]:
    """kohya/A1111 metadata of the LoRA file; DoRA, convolution and text-encoder settings are read off ``state``."""
    is_dora = any(key.endswith(f".{DORA_SCALE}") for key in state)
    has_conv = any(k.startswith(f"{UNET_PREFIX}_") and k.endswith(".lora_down.weight") and v.dim() == 4
                   for k, v in state.items())
    has_te = any(k.startswith(TE_KEY_PREFIXES) for k in state)
    network_args: dict[str, str] = {}
    comment = [f"pivotal tuning; trigger tokens {trigger_tokens}"]
    if is_dora:
        # LyCORIS' description of a DoRA file; its dora_scale is per input column, as LyCORIS' default.
        network_args.update({"algo": "lora", "dora_wd": "True"})
        comment.append("DoRA (weight-decomposed LoRA): dora_scale per input column, stored in fp32")
    if has_conv:
        network_args.update({"conv_dim": str(rank), "conv_alpha": str(alpha)})
    if has_te and te_rank is not None and (te_rank != rank or te_alpha != alpha):
        network_args.update({"text_encoder_dim": str(te_rank), "text_encoder_alpha": str(te_alpha)})
        comment.append(f"text-encoder LoRA rank {te_rank}, alpha {te_alpha} (UNet rank {rank}, alpha {alpha})")
    metadata = {
        "ss_output_name": name,
        "ss_base_model_version": BASE_MODEL_VERSION[version],
        "ss_network_module": "lycoris.kohya" if is_dora else "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_resolution": f"({resolution[1]}, {resolution[0]})",
        "ss_num_train_images": str(n_images),
        "ss_tag_frequency": json.dumps(tag_frequency(captions)),
        "ss_sd_model_name": base_model_name,
        "ss_training_comment": "; ".join(comment),
    }
    if network_args:
        metadata["ss_network_args"] = json.dumps(network_args)
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = kohya_hashes(state, metadata)
    metadata.update({
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{ARCHITECTURE[version]}/lora",
        "modelspec.implementation": LORA_IMPLEMENTATION[version],
        "modelspec.title": name,
        "modelspec.resolution": f"{resolution[1]}x{resolution[0]}",
    })
    return {k: str(v) for k, v in metadata.items()}


def embeddings_metadata(*, name: str, version: str, tokens: list[str]) -> dict[str, str]:
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{ARCHITECTURE[version]}/textual-inversion",
        "modelspec.implementation": STABILITY_AI_CODE,
        "modelspec.title": name,
        "tokens": json.dumps(tokens),
    }


def write_safetensors(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)


def write_lora(folder: Path, name: str, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    check_kohya_state(state)
    path = folder / f"{name}{LORA_SUFFIX}"
    write_safetensors(path, state, metadata)
    return path


#: The embedding file's key per text encoder. SD1.5: kohya's and A1111's ``emb_params``, the one key InvokeAI's probe
#: reads the width of ([n, 768] under any other single key is classified by its row count and never used); A1111,
#: ComfyUI and diffusers read any single key. SDXL: ``clip_l`` and ``clip_g``, which every client reads.
EMBEDDING_KEYS = {"sd15": ("emb_params",), "sdxl": ("clip_l", "clip_g")}
#: Keys this project wrote before, still read back.
LEGACY_EMBEDDING_KEYS = {"sd15": ("clip_l",), "sdxl": ("clip_l", "clip_g")}


def embedding_file_state(version: str, vectors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """One tensor [n, width] per text encoder (in the model's order) under the keys the clients read."""
    keys = EMBEDDING_KEYS[version]
    if len(vectors) != len(keys):
        raise ValueError(f"a {version} embedding file holds {len(keys)} tensor(s), got {len(vectors)}")
    return dict(zip(keys, vectors, strict=True))


def embedding_vectors(state: dict[str, torch.Tensor], version: str, where: str = "the embedding file"
                      ) -> list[torch.Tensor]:
    """The per-encoder vectors of an embedding file this project wrote (current or earlier keys)."""
    for keys in (EMBEDDING_KEYS[version], LEGACY_EMBEDDING_KEYS[version]):
        if all(key in state for key in keys):
            return [state[key] for key in keys]
    raise ValueError(f"{where} has no {' / '.join(EMBEDDING_KEYS[version])} vectors for this {version} model "
                     f"(keys: {sorted(state)})")


def write_embeddings(folder: Path, name: str, version: str, vectors: list[torch.Tensor], metadata: dict[str, str],
                     dtype: torch.dtype = torch.float32) -> Path:
    path = folder / f"{name}{EMBEDDINGS_SUFFIX}"
    state = embedding_file_state(version, [v.to(dtype) for v in vectors])
    write_safetensors(path, state, metadata)
    return path


def write_special_params(folder: Path, token_dict: dict[str, str]) -> Path:
    path = folder / SPECIAL_PARAMS
    atomic_write_text(path, json.dumps(token_dict, indent=2) + "\n")
    return path


def find_artifacts(folder: Path) -> dict[str, Path | None]:
    """Locate the files of an exported LoRA in a folder (checkpoint folder or unpacked zip)."""
    folder = Path(folder)

    def one(suffix: str) -> Path | None:
        matches = sorted(folder.glob(f"*{suffix}"))
        if len(matches) > 1:
            raise ValueError(f"{folder} holds several *{suffix} files: {[m.name for m in matches]}")
        return matches[0] if matches else None

    unet_dir = folder / FULL_UNET_DIR
    return {
        "lora": one(LORA_SUFFIX),
        "embeddings": one(EMBEDDINGS_SUFFIX),
        "special_params": folder / SPECIAL_PARAMS if (folder / SPECIAL_PARAMS).is_file() else None,
        "training_args": folder / TRAINING_ARGS if (folder / TRAINING_ARGS).is_file() else None,
        "unet": unet_dir if (unet_dir / "config.json").is_file() else None,
    }
