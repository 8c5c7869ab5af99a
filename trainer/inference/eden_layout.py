"""Which trained folder this is: ours, or Eden's, and where its files are.

The two layouts share ``special_params.json`` (the token map), ``training_args.json`` (the run's settings, with the
same ``sd_model_version`` / ``ckpt_path`` / ``pretrained_model`` keys) and ``<name>_embeddings.safetensors``
(``clip_l``, ``clip_g``). They differ in the weights:

- LoRA: ours is ``<name>_lora.safetensors`` in kohya keys, the SDXL UNet in SGM names (``input_blocks_4_1_...``),
  with its true alpha. Eden's (``save_checkpoint`` of its ``trainer/checkpoint.py``) is ``<name>_sdxl.safetensors``
  or ``<name>_sd15.safetensors``, kohya keys in diffusers block names (``down_blocks_1_attentions_0_...``), alpha =
  rank; older Eden checkpoints also kept diffusers' ``pytorch_lora_weights.safetensors``.
- Full UNet: ours is ``unet/`` (diffusers); Eden's is ``config.json`` + ``diffusion_pytorch_model.safetensors``
  beside the other files.
- Tokens: ours are ``inserting_list_tokens`` of ``training_args.json``; Eden's loader names the embedding rows
  ``<s0>``, ``<s1>``, ... (its ``load_embeddings``).
- Delivered as: ours ``<name>.zip``; Eden's ``<name>_eden_concept_lora_<time>.tar``.

This module only says which layout an unpacked folder follows and where its files are. Both archives are unpacked by
one extractor (:func:`trainer.inference.bundle.extract_bundle`, the archive rules of training data), and what the
files say is checked there and in :mod:`trainer.inference.fit`, whichever layout they follow.

Both LoRA files are read by diffusers' own kohya conversion (``load_lora_weights``), which maps SGM and diffusers
block names onto the same modules, so the same weights give the same images in either layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer.data.ingest.safety import printable
from trainer.data.ingest.sniff import read_head, sniff
from trainer.export.files import (
    EMBEDDINGS_SUFFIX,
    FULL_UNET_DIR,
    LORA_SUFFIX,
    SPECIAL_PARAMS,
    TRAINING_ARGS,
    find_artifacts,
)

OURS = "ours"
EDEN = "eden"
#: Eden's LoRA file is ``f"{name}_{sd_model_version}.safetensors"``; older Eden checkpoints kept diffusers' own file.
EDEN_LORA_SUFFIXES = ("_sdxl.safetensors", "_sd15.safetensors")
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
EDEN_UNET_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
#: safetensors files in an Eden folder that are not its LoRA (peft's adapter is deleted by Eden's own save).
_NOT_A_LORA = ("diffusion_pytorch_model.safetensors", "adapter_model.safetensors")
_LORA_KEY_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "unet.", "text_encoder.", "text_encoder_2.")

EXPECTED_FILES = (
    f"expected this trainer's layout ({SPECIAL_PARAMS}, {TRAINING_ARGS} and <name>{LORA_SUFFIX}, "
    f"<name>{EMBEDDINGS_SUFFIX} or {FULL_UNET_DIR}/) or Eden's ({SPECIAL_PARAMS}, {TRAINING_ARGS}, "
    f"<name>{EMBEDDINGS_SUFFIX} and <name>_sdxl.safetensors, <name>_sd15.safetensors or "
    f"{' + '.join(EDEN_UNET_FILES)})"
)


@dataclass
class BundleFiles:
    layout: str
    """``ours`` or ``eden``."""
    lora: Path | None
    embeddings: Path | None
    unet_dir: Path | None
    special_params: Path
    training_args: Path


#: What ``archive_kind`` returns: a zip, or a tar, plain or compressed (a recompressed Eden tar).
TAR_KINDS = ("tar", "gzip", "bz2", "xz")


def archive_kind(path: Path) -> str | None:
    """``zip``, ``tar``, ``gzip``, ``bz2`` or ``xz`` from the file's first bytes (a downloaded file's name says
    nothing), else ``None``."""
    kind = sniff(read_head(path, 512))
    return kind if kind == "zip" or kind in TAR_KINDS else None


def bundle_root(folder: Path) -> Path:
    """``folder``, or its only subfolder when the files were packed one level down (``checkpoint-300/...``)."""
    if (folder / SPECIAL_PARAMS).is_file() or (folder / TRAINING_ARGS).is_file():
        return folder
    subfolders = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if len(subfolders) == 1 and (subfolders[0] / TRAINING_ARGS).is_file():
        return subfolders[0]
    return folder


def find_bundle_files(folder: Path, label: str | None = None) -> BundleFiles:
    """The files of a trained folder in either layout, or a ``ValueError`` that lists what was expected.

    ``label`` names the folder in messages (the archive it was unpacked from).
    """
    folder = Path(folder)
    label = label or folder.name
    ours = find_artifacts(folder)
    special, args = ours["special_params"], ours["training_args"]
    if special is None or args is None:
        raise ValueError(f"{label} is not a trained LoRA bundle: {EXPECTED_FILES}; found {_listing(folder)}")
    if ours["lora"] is not None or ours["unet"] is not None:
        return BundleFiles(OURS, ours["lora"], ours["embeddings"], ours["unet"], special, args)
    eden_lora = _eden_lora(folder)
    eden_unet = folder if all((folder / name).is_file() for name in EDEN_UNET_FILES) else None
    if eden_lora is not None or eden_unet is not None:
        return BundleFiles(EDEN, eden_lora, ours["embeddings"], eden_unet, special, args)
    if ours["embeddings"] is not None:  # tokens only (no LoRA trained): the same in both layouts
        return BundleFiles(OURS, None, ours["embeddings"], None, special, args)
    raise ValueError(f"{label} holds no LoRA, embeddings or UNet weights: {EXPECTED_FILES}; found "
                     f"{_listing(folder)}")


def _eden_lora(folder: Path) -> Path | None:
    """Eden's LoRA: the top-level ``.safetensors`` that is not the embeddings (the rule of Eden's ComfyUI node)."""
    candidates = sorted(
        p for p in folder.glob("*.safetensors")
        if p.is_file() and not p.name.endswith("embeddings.safetensors") and p.name not in _NOT_A_LORA
        and _holds_lora_keys(p)
    )
    if len(candidates) > 1:
        # An Eden checkpoint may keep diffusers' own file beside the kohya one: both hold the same weights.
        preferred = [p for p in candidates if p.name.endswith(EDEN_LORA_SUFFIXES)]
        candidates = preferred or [p for p in candidates if p.name == DIFFUSERS_LORA_FILE] or candidates
    if len(candidates) > 1:
        raise ValueError(f"{folder.name} holds several LoRA files, {[p.name for p in candidates]}: keep one")
    return candidates[0] if candidates else None


def _holds_lora_keys(path: Path) -> bool:
    """kohya (``lora_unet_...``, ``lora_te1_...``) or diffusers (``unet....``, ``text_encoder....``) LoRA keys."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = handle.keys()
    except Exception:  # not a readable safetensors file: not a LoRA either
        return False
    return bool(keys) and all(key.startswith(_LORA_KEY_PREFIXES) for key in keys)


def embedding_rows(path: Path, max_rows: int) -> int:
    """How many token vectors an embeddings file holds (from its header, without reading the tensors); more than
    ``max_rows`` is refused, since Eden's layout adds one token per row."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            shapes = [handle.get_slice(key).get_shape() for key in keys[:8]]
    except Exception as error:  # any parse failure of a stranger's file (header, dtype, truncation)
        text = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ValueError(f"{path.name} is not a readable .safetensors file ({text})") from None
    if not shapes or len(keys) > 8 or any(len(shape) != 2 for shape in shapes) or len({s[0] for s in shapes}) != 1:
        raise ValueError(f"{path.name} is not a token embeddings file: expected tensors of shape [n_tokens, width], "
                         f"got {shapes[:4]}")
    if shapes[0][0] > max_rows:
        raise ValueError(f"{path.name} holds {shapes[0][0]} token vectors per text encoder, more than the limit of "
                         f"{max_rows}")
    return shapes[0][0]


def eden_tokens(n_rows: int) -> list[str]:
    """The token names Eden's ``load_embeddings`` gives the rows it reads."""
    return [f"<s{i}>" for i in range(n_rows)]


def eden_version(training_args: dict, files: BundleFiles) -> str | None:
    """``sdxl``/``sd15`` of an Eden folder: its config's field, else the LoRA's file name, else the embedding keys."""
    version = training_args.get("sd_model_version")
    pretrained = training_args.get("pretrained_model")
    if version is None and isinstance(pretrained, dict):
        version = pretrained.get("version")
    if version is None and files.lora is not None:
        for suffix in EDEN_LORA_SUFFIXES:
            if files.lora.name.endswith(suffix):
                version = suffix[1:5]
    if version is None and files.embeddings is not None:
        from safetensors import safe_open

        with safe_open(str(files.embeddings), framework="pt") as handle:
            keys = handle.keys()
        version = "sdxl" if "clip_g" in keys else "sd15"
    return version


def _listing(folder: Path, limit: int = 12) -> str:
    # Names come from a stranger's archive: printable and short in a message.
    names = sorted(printable(p.name)[:80] + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "nothing"
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
