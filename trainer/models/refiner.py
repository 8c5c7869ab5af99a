"""The SDXL refiner for the predictor: found like a base model, loaded around the base model's own VAE and CLIP-G.

``TRAINER_SDXL_REFINER`` names it as ``ckpt_path`` names a base model: a hub id (default
``stabilityai/stable-diffusion-xl-refiner-1.0``), a local diffusers folder, a single-file checkpoint (SGM layout,
as ``sd_xl_refiner_1.0.safetensors``) or an http(s) URL of one, downloaded once into the model cache.
``tiny-sdxl-refiner`` is the offline test fixture, used only when named.

The refiner is built around the base model's VAE and second text encoder (the same modules, as cog-sdxl does): the
real refiner ships the same VAE and the same OpenCLIP-G, so this saves their memory. A refiner whose UNet does not
fit those modules is refused with a message saying which size differs.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.models.loading import (
    HUB_ID,
    SINGLE_FILE_SUFFIXES,
    _checkpoint_keys,
    download_checkpoint,
    forget_download,
)
from trainer.models.tiny import TINY_REFINER, tiny_model_dir
from trainer.utils.download import redact_url

logger = logging.getLogger(__name__)

DEFAULT_REFINER = "stabilityai/stable-diffusion-xl-refiner-1.0"
ENV_REFINER = "TRAINER_SDXL_REFINER"
_REFINER_CLASS = "StableDiffusionXLImg2ImgPipeline"


@dataclass(frozen=True)
class RefinerSource:
    kind: str
    """tiny, diffusers_dir, single_file, hub or url"""
    location: str

    def describe(self) -> str:
        return redact_url(self.location) if self.kind == "url" else self.location


def resolve_refiner(configured: str | None = None) -> RefinerSource:
    """Where the refiner comes from: ``configured`` (set-up), else ``TRAINER_SDXL_REFINER``, else the default."""
    location = (configured or os.environ.get(ENV_REFINER) or DEFAULT_REFINER).strip()
    if location == TINY_REFINER:
        return RefinerSource("tiny", location)
    if location.startswith(("http://", "https://")):
        return RefinerSource("url", location)
    path = Path(location).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"{ENV_REFINER} {location!r} is a folder but not a diffusers model (no model_index.json)")
        return RefinerSource("diffusers_dir", str(path))
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ValueError(f"{ENV_REFINER} {location!r} is a file but not a checkpoint: expected one of "
                             f"{sorted(SINGLE_FILE_SUFFIXES)}")
        return RefinerSource("single_file", str(path))
    if HUB_ID.match(location) and not location.startswith((".", "/", "~")):
        return RefinerSource("hub", location)
    raise ValueError(f"{ENV_REFINER} {location!r} is not an existing file or folder, an http(s) URL or a hub id")


def load_refiner(source: RefinerSource, *, vae, text_encoder_2, dtype: torch.dtype, cache_dir: Path,
                 single_file_config: str | None = None):
    """A ``StableDiffusionXLImg2ImgPipeline`` with the refiner's UNet, tokenizer and scheduler around the given
    ``vae`` and ``text_encoder_2`` (on the CPU, in ``dtype``)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    shared = {"vae": vae, "text_encoder_2": text_encoder_2, "text_encoder": None, "tokenizer": None,
              "add_watermarker": False, "dtype": dtype}
    kind, location = source.kind, source.location
    if kind == "url":
        location, kind = str(download_checkpoint(location, Path(cache_dir))), "single_file"
    if kind == "tiny":
        location, kind = str(tiny_model_dir(location, Path(cache_dir))), "diffusers_dir"

    if kind == "diffusers_dir":
        _check_refiner_index(json.loads((Path(location) / "model_index.json").read_text(encoding="utf-8")), location)
        pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(location, **shared)
    elif kind == "hub":
        hub_cache = str(Path(cache_dir) / "hub")
        _check_refiner_index(_hub_index(location, hub_cache), location)
        try:
            pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(location, cache_dir=hub_cache, **shared)
        except OSError as error:
            raise ValueError(f"could not load the refiner {location!r} from the Hugging Face hub: {error}") from None
    else:
        path = Path(location)
        try:
            _check_refiner_keys(path)
        except ValueError:
            if source.kind == "url":
                forget_download(path)  # not a refiner: nothing of it stays in the cache
            raise
        config = single_file_config or DEFAULT_REFINER
        try:
            pipe = StableDiffusionXLImg2ImgPipeline.from_single_file(str(path), config=config, **shared)
        except OSError as error:
            raise ValueError(
                f"could not load the refiner checkpoint {path.name}: its architecture configs come from {config!r}, "
                f"which is not available ({error})"
            ) from None
    _check_fit(pipe, source)
    pipe.unet.requires_grad_(False)
    pipe.unet.eval()
    pipe.set_progress_bar_config(disable=True)
    logger.info("refiner ready: %s", source.describe())
    return pipe


def _hub_index(hub_id: str, cache_dir: str) -> dict:
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(hub_id, "model_index.json", cache_dir=cache_dir)).read_text("utf-8"))
    except Exception as error:  # network, auth and missing-repo errors all mean "cannot load"
        raise ValueError(
            f"could not fetch the refiner {hub_id!r} from the Hugging Face hub ({type(error).__name__}); check the id,"
            f" the network and HF_TOKEN, or set {ENV_REFINER} to a local folder or checkpoint"
        ) from None


def _check_refiner_index(index: dict, where: str) -> None:
    name = index.get("_class_name", "")
    has_text_encoder = (index.get("text_encoder") or [None])[0] is not None
    if name != _REFINER_CLASS or has_text_encoder or "text_encoder_2" not in index:
        raise ValueError(f"{where} is a {name or 'diffusers'} model, not an SDXL refiner (an img2img pipeline with "
                         "only the second text encoder)")


def _check_refiner_keys(path: Path) -> None:
    keys = _checkpoint_keys(path)
    # The SGM refiner conditions on OpenCLIP-G alone, as embedder 0; a base model has CLIP-L there and CLIP-G as 1.
    is_refiner = (any(k.startswith("conditioner.embedders.0.model.") for k in keys)
                  and not any(k.startswith("conditioner.embedders.1.") for k in keys)
                  and any(k.startswith("model.diffusion_model.") for k in keys))
    if not is_refiner:
        raise ValueError(f"{path.name} is not an SDXL refiner checkpoint (no OpenCLIP-G-only conditioner)")


def _check_fit(pipe, source: RefinerSource) -> None:
    unet, vae, encoder = pipe.unet.config, pipe.vae.config, pipe.text_encoder_2.config
    time_inputs = 5 if pipe.config.requires_aesthetics_score else 6
    expected = {
        "cross_attention_dim": (unet.cross_attention_dim, encoder.hidden_size, "the second text encoder's width"),
        "in_channels": (unet.in_channels, vae.latent_channels, "the VAE's latent channels"),
        "projection_class_embeddings_input_dim": (
            unet.projection_class_embeddings_input_dim,
            time_inputs * unet.addition_time_embed_dim + encoder.projection_dim,
            "the second text encoder's projection plus the size conditioning",
        ),
    }
    for name, (have, want, what) in expected.items():
        if have != want:
            raise ValueError(f"the refiner {source.describe()} does not fit this base model: its UNet's {name} is "
                             f"{have}, {what} gives {want}")
