"""Loading SD1.5 and SDXL from a hub id, a local diffusers folder, a single-file checkpoint or an http(s) URL.

All sources end up in the same place: a diffusers pipeline whose components are unpacked into :class:`SDModels`.
The tiny test fixtures are diffusers folders too and take the same path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from trainer.models.hub import fetch_requested, requested_key, sweep_partial_fetches
from trainer.models.tiny import TINY_NAMES, tiny_model_dir

logger = logging.getLogger(__name__)

Version = Literal["sdxl", "sd15"]
DEFAULT_MODELS: dict[str, str] = {
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
}
#: Environment variables that replace the default base model of each family (hub id, folder, file or URL).
DEFAULT_MODEL_ENV = {"sdxl": "TRAINER_SDXL_MODEL", "sd15": "TRAINER_SD15_MODEL"}
SINGLE_FILE_SUFFIXES = {".safetensors", ".ckpt", ".pt", ".pth", ".bin"}
#: Largest checkpoint fetched from a URL: an fp32 SDXL file is about 14 GB.
ENV_MAX_MODEL_BYTES = "TRAINER_MAX_MODEL_BYTES"
DEFAULT_MAX_MODEL_BYTES = 16 << 30
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def model_cache_dir(configured: str | None = None) -> Path:
    """Where downloaded checkpoints, hub models and the tiny fixtures are cached."""
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("TRAINER_MODEL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sd-lora-trainer"


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["tiny", "diffusers_dir", "single_file", "hub", "url"]
    location: str
    """Folder, file, hub id or URL (as given)."""
    declared_version: Version | None = None

    def describe(self) -> str:
        from trainer.utils.download import redact_url

        return redact_url(self.location) if self.kind == "url" else self.location


@dataclass
class SDModels:
    version: Version
    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    scheduler: Any
    """The pipeline's own inference scheduler (its config also seeds the training noise scheduler)."""
    source: ModelSource
    load_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_sdxl(self) -> bool:
        return self.version == "sdxl"

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def unet_size_multiple(self) -> int:
        """Pixel sizes must be multiples of this (VAE factor × UNet downsampling)."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def pipeline(self, scheduler=None):
        """A diffusers pipeline over these very modules (no copies), for sampling and evaluation."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        scheduler = scheduler or self.scheduler
        if self.is_sdxl:
            # No watermark in samples and evaluation renders; the predictor applies its own when asked.
            return StableDiffusionXLPipeline(
                vae=self.vae, text_encoder=self.text_encoders[0], text_encoder_2=self.text_encoders[1],
                tokenizer=self.tokenizers[0], tokenizer_2=self.tokenizers[1], unet=self.unet, scheduler=scheduler,
                add_watermarker=False,
            )
        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoders[0], tokenizer=self.tokenizers[0], unet=self.unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )


# ------------------------------------------------------------------------------------------------ resolution
def is_hub_id(text: str) -> bool:
    """``org/name`` as the Hugging Face hub spells repositories (no ``.``/``..`` parts, so never a path upwards)."""
    return bool(HUB_ID.match(text)) and not any(part.startswith(".") for part in text.split("/"))


def resolve_source(ckpt_path: str | None, pretrained_model: dict | None, sd_model_version: Version | None,
                   cache_dir: Path, *, local_paths: bool = True) -> ModelSource:
    """Decide what to load from the config's ``ckpt_path`` / ``pretrained_model`` / ``sd_model_version``.

    ``local_paths`` False (a request from the network, a LoRA zip's ``training_args.json``): the names are never
    looked up on this machine's disk, so a missing file, a folder and a file all get the same answer; only hub ids,
    http(s) URLs and the tiny fixtures are accepted.
    """
    declared = sd_model_version
    if pretrained_model and not ckpt_path:
        unknown = set(pretrained_model) - {"path", "url", "version", "name", "config"}
        if unknown:
            raise ValueError(f"pretrained_model has unknown keys {sorted(unknown)}; it takes path, url and version")
        version = pretrained_model.get("version")
        if version is not None and version not in ("sdxl", "sd15"):
            raise ValueError(f"pretrained_model.version must be 'sdxl' or 'sd15', got {version!r}")
        if version and declared and version != declared:
            raise ValueError(
                f"sd_model_version is {declared!r} but pretrained_model.version is {version!r}: make them agree"
            )
        declared = declared or version
        path, url = pretrained_model.get("path"), pretrained_model.get("url")
        usable_path = path in TINY_NAMES or (Path(path).expanduser().exists() if local_paths else is_hub_id(str(path)))
        if path and (usable_path or not url):
            ckpt_path = path
        elif url:
            ckpt_path = url
        else:
            raise ValueError("pretrained_model needs a 'path' or a 'url'")
    if not ckpt_path:
        version = declared or "sdxl"
        ckpt_path = os.environ.get(DEFAULT_MODEL_ENV[version]) or DEFAULT_MODELS[version]
        declared = version
        local_paths = True  # the operator's default (or the project's), not a request's choice: any form is fine

    location = str(ckpt_path).strip()
    if location in TINY_NAMES:
        return ModelSource("tiny", location, declared)
    if location.startswith(("http://", "https://")):
        return ModelSource("url", location, declared)
    if not local_paths:
        if is_hub_id(location):
            return ModelSource("hub", location, declared)
        raise ValueError(
            f"ckpt_path {location[:200]!r}: local paths are not accepted here; give a hub id (org/name) or an "
            "http(s) URL of a checkpoint (the operator can allow local paths with TRAINER_ALLOW_LOCAL_SOURCES)"
        )
    path = Path(location).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(
                f"ckpt_path {location!r} is a folder but not a diffusers model (model_index.json is missing)"
            )
        return ModelSource("diffusers_dir", str(path), declared)
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ValueError(
                f"ckpt_path {location!r} is a file but not a checkpoint: expected one of "
                f"{sorted(SINGLE_FILE_SUFFIXES)}"
            )
        return ModelSource("single_file", str(path), declared)
    if HUB_ID.match(location) and not location.startswith((".", "/", "~")):
        return ModelSource("hub", location, declared)
    raise ValueError(
        f"ckpt_path {location!r} is not an existing file or folder, an http(s) URL or a hub id (org/name)"
    )


def download_checkpoint(url: str, cache_dir: Path) -> Path:
    """Fetch a checkpoint URL once into the cache (at most ``TRAINER_MAX_MODEL_BYTES``); later runs reuse the file.

    The file appears only when complete; one that turns out not to be a Stable Diffusion checkpoint is removed again
    (see :func:`forget_download`), so the cache keeps only usable models.
    """
    from urllib.parse import urlsplit

    from trainer.utils.download import TooLarge, download, redact_url

    name = Path(urlsplit(url).path).name or "model.safetensors"
    if Path(name).suffix.lower() not in SINGLE_FILE_SUFFIXES:
        name += ".safetensors"
    digest = hashlib.sha256(url.split("?")[0].encode()).hexdigest()[:16]
    target = cache_dir / "downloads" / digest / name
    if target.is_file():
        logger.info("using cached checkpoint %s", target)
        return target
    logger.info("downloading the base model %s to %s", redact_url(url), target)
    try:
        return download(url, target, progress=True, max_bytes=max_model_bytes())
    except TooLarge as error:
        forget_download(target)
        raise TooLarge(f"{error} for a checkpoint ({ENV_MAX_MODEL_BYTES}, set by the operator)") from None
    except BaseException:
        forget_download(target)
        raise


def max_model_bytes() -> int:
    """The largest checkpoint downloaded from a URL (``TRAINER_MAX_MODEL_BYTES``, default 16 GiB)."""
    value = os.environ.get(ENV_MAX_MODEL_BYTES, "").strip()
    try:
        return int(float(value)) if value else DEFAULT_MAX_MODEL_BYTES
    except ValueError:
        raise ValueError(f"{ENV_MAX_MODEL_BYTES} must be a number of bytes, got {value!r}") from None


#: A partial download untouched this long belongs to a process that is gone (live ones write continuously).
STALE_PARTIAL_SECONDS = 600.0


def sweep_downloads(cache_dir: Path) -> None:
    """Remove partial checkpoint and hub downloads that killed processes left in the cache (at start-up)."""
    from trainer.utils.atomic import sweep_partials

    removed = sweep_partials(Path(cache_dir) / "downloads", older_than=STALE_PARTIAL_SECONDS)
    if removed:
        logger.info("removed %d partial download(s) from %s", removed, Path(cache_dir) / "downloads")
    removed = sweep_partial_fetches(cache_dir, older_than=STALE_PARTIAL_SECONDS)
    if removed:
        logger.info("removed %d partial hub download(s) from %s", removed, cache_dir)


def forget_download(target: Path) -> None:
    """Remove a downloaded checkpoint and its cache folder (it failed to download or is not a checkpoint)."""
    import shutil

    folder = target.parent
    if folder.parent.name == "downloads":
        shutil.rmtree(folder, ignore_errors=True)


# -------------------------------------------------------------------------------------------- version checks
def _version_of_diffusers_dir(folder: Path) -> Version:
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    return _version_of_model_index(index, str(folder))


def _version_of_model_index(index: dict, where: str) -> Version:
    name = index.get("_class_name", "")
    if "text_encoder_2" in index or "XL" in name:
        if "Img2Img" in name and "text_encoder" not in index:
            raise ValueError(f"{where} is an SDXL refiner, which cannot be trained here; use an SDXL base model")
        return "sdxl"
    if "unet" in index and "text_encoder" in index:
        return "sd15"
    raise ValueError(f"{where} is a {name or 'diffusers'} pipeline, not Stable Diffusion 1.x or SDXL")


def _checkpoint_keys(path: Path) -> list[str]:
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                return list(handle.keys())
        except Exception as error:  # any parse failure is "not a checkpoint"
            raise ValueError(f"{path.name} is not a readable .safetensors file ({error})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # likewise, whatever torch.load trips over
        raise ValueError(f"{path.name} is not a readable checkpoint ({type(error).__name__}: {error})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"{path.name} does not hold a state dict")
    return list(state.keys())


def version_of_single_file(path: Path) -> Version:
    keys = _checkpoint_keys(path)
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    has_unet = any(k.startswith("model.diffusion_model.") for k in keys)
    if has_unet and any(k.startswith("cond_stage_model.") for k in keys):
        return "sd15"
    if any(k.startswith(("down_blocks.", "lora_unet_", "lora_te")) for k in keys):
        raise ValueError(f"{path.name} is a LoRA or a lone diffusers component, not a full Stable Diffusion checkpoint")
    raise ValueError(f"{path.name} is not a Stable Diffusion 1.x or SDXL checkpoint (unrecognised keys)")


def _check_version(detected: Version, declared: Version | None, where: str) -> Version:
    if declared and detected != declared:
        names = {"sdxl": "an SDXL", "sd15": "an SD1.5"}
        raise ValueError(
            f"sd_model_version is {declared!r} but {where} is {names[detected]} model: set sd_model_version to "
            f"{detected!r} (or null to detect it) or choose another model"
        )
    return detected


# ------------------------------------------------------------------------------------------------- loading
def load_models(source: ModelSource, *, dtype: torch.dtype = torch.float32, cache_dir: Path | None = None,
                variant: str | None = None, single_file_config: str | None = None) -> SDModels:
    """Load the pipeline components on the CPU in ``dtype`` (frozen weights' working dtype)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    cache_dir = cache_dir or model_cache_dir()
    start = time.perf_counter()
    kind, location = source.kind, source.location
    common: dict[str, Any] = {"dtype": dtype}
    shown = location  # messages name the model as it was given, not the cache folder it was fetched to
    requested = requested_key(location) if kind == "hub" else None
    if requested is not None:
        # A request's choice: allowed, sized up and fetched through the guarded client (trainer/models/hub.py).
        declared = source.declared_version

        def check_index(index: dict) -> None:
            _check_version(_version_of_model_index(index, location), declared, location)

        location = str(fetch_requested(location, requested, cache_dir, "pipeline", variant=variant,
                                       check_index=check_index))
        kind = "diffusers_dir"

    if kind == "url":
        downloaded = download_checkpoint(location, cache_dir)
        try:
            version_of_single_file(downloaded)
        except ValueError:
            forget_download(downloaded)  # not a model: nothing of it stays in the cache
            raise
        location, kind = str(downloaded), "single_file"
    if kind == "tiny":
        location = str(tiny_model_dir(location, cache_dir))
        kind = "diffusers_dir"

    if kind == "diffusers_dir":
        version = _check_version(_version_of_diffusers_dir(Path(location)), source.declared_version, shown)
        cls = StableDiffusionXLPipeline if version == "sdxl" else StableDiffusionPipeline
        extra = {} if version == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
        try:
            pipe = cls.from_pretrained(location, variant=variant, **extra, **common)
        except OSError as error:
            if requested is None:
                raise
            raise ValueError(f"{requested} {shown!r}: the files fetched from the hub do not load as a "
                             f"{version} pipeline ({str(error).splitlines()[0][:200]})") from None
    elif kind == "hub":
        version = _check_version(_hub_version(location, cache_dir), source.declared_version, location)
        cls = StableDiffusionXLPipeline if version == "sdxl" else StableDiffusionPipeline
        extra = {} if version == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
        try:
            pipe = cls.from_pretrained(location, cache_dir=str(cache_dir / "hub"), variant=variant, **extra, **common)
        except OSError as error:
            raise ValueError(f"could not load {location!r} from the Hugging Face hub: {error}") from None
    else:
        path = Path(location)
        version = _check_version(version_of_single_file(path), source.declared_version, path.name)
        cls = StableDiffusionXLPipeline if version == "sdxl" else StableDiffusionPipeline
        config_name = config = single_file_config or DEFAULT_MODELS[version]
        config_key = requested_key(config)
        if config_key is not None:
            config = str(fetch_requested(config, config_key, cache_dir, "configs"))
        try:
            if version == "sdxl" and (text_encoder_2 := _sdxl_text_encoder_2(path, config, dtype)) is not None:
                common["text_encoder_2"] = text_encoder_2
            pipe = cls.from_single_file(str(path), config=config, **common)
        except OSError as error:
            raise ValueError(
                f"could not load the single-file checkpoint {path.name}: its architecture configs come from "
                f"{config_name!r}, which is not available ({error}). Set single_file_config to a local diffusers "
                "folder of the same architecture."
            ) from None
        except (NotImplementedError, SingleFileComponentError) as error:
            # diffusers builds each module on the meta device and fills it from the file: weights the file lacks
            # surface as a failed copy out of a meta tensor, or as its own component error.
            if isinstance(error, NotImplementedError) and "meta tensor" not in str(error):
                raise
            raise _incomplete_checkpoint(path.name, config_name, str(error).splitlines()[0]) from None
        _check_no_meta_weights(pipe, path.name, config_name)

    models = _from_pipeline(pipe, version, source)
    models.load_seconds = time.perf_counter() - start
    logger.info("loaded %s (%s) in %.1fs", source.describe(), version, models.load_seconds)
    return models


_SDXL_CLIP_L_POSITIONS = "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"
_SDXL_CLIP_G_PREFIX = "conditioner.embedders.1.model."


def _checkpoint_tensors(path: Path, wanted) -> dict[str, torch.Tensor]:
    """The tensors whose keys satisfy ``wanted(key)``, without reading the rest of a .safetensors file."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            names = handle.keys()
            return {k: handle.get_tensor(k) for k in names if wanted(k)}
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    state = state.get("state_dict", state)
    return {k: v for k, v in state.items() if wanted(k)}


def _sdxl_text_encoder_2(path: Path, config: str, dtype: torch.dtype):
    """SDXL's CLIP-G built from the checkpoint's OpenCLIP keys, where diffusers would build it wrongly; else None.

    diffusers tells the two SDXL text encoders apart by width alone and tries CLIP-L first, so when both have the same
    width (small test models; never the real 768/1280) it fills text_encoder_2 with CLIP-L's weights and leaves its
    projection uninitialised. Real SDXL checkpoints keep diffusers' own loading.
    """
    clip_g_positions = _SDXL_CLIP_G_PREFIX + "positional_embedding"
    positions = _checkpoint_tensors(path, {_SDXL_CLIP_L_POSITIONS, clip_g_positions}.__contains__)
    if len(positions) < 2 or positions[_SDXL_CLIP_L_POSITIONS].shape[-1] != positions[clip_g_positions].shape[-1]:
        return None
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    encoder = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(config, subfolder="text_encoder_2"))
    clip_g = _checkpoint_tensors(path, lambda key: key.startswith(_SDXL_CLIP_G_PREFIX))
    encoder.load_state_dict(convert_open_clip_checkpoint(encoder, clip_g, prefix=_SDXL_CLIP_G_PREFIX), strict=True)
    return encoder.to(dtype)


def _incomplete_checkpoint(name: str, config: str, detail: str) -> ValueError:
    return ValueError(
        f"the single-file checkpoint {name} is incomplete or does not match the architecture of {config!r}: {detail}"
    )


def _check_no_meta_weights(pipe, name: str, config: str) -> None:
    """Refuse a pipeline with weights the checkpoint did not fill.

    For text encoders diffusers leaves parameters it found no weights for on the meta device without a word; they
    would only fail later, at the first forward pass, with an unrelated-looking error.
    """
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, component, None)
        if module is None:
            continue
        missing = [n for n, p in module.named_parameters() if p.is_meta]
        if missing:
            detail = f"no weights for {len(missing)} {component} parameters (e.g. {missing[0]})"
            raise _incomplete_checkpoint(name, config, detail)


def _hub_version(hub_id: str, cache_dir: Path) -> Version:
    from huggingface_hub import hf_hub_download

    try:
        index_path = hf_hub_download(hub_id, "model_index.json", cache_dir=str(cache_dir / "hub"))
    except Exception as error:  # network, auth and missing-repo errors all mean "cannot load"
        raise ValueError(
            f"could not fetch {hub_id!r} from the Hugging Face hub ({type(error).__name__}); check the id, your "
            "network and HF_TOKEN, or give a local folder or checkpoint in ckpt_path"
        ) from None
    return _version_of_model_index(json.loads(Path(index_path).read_text(encoding="utf-8")), hub_id)


def _from_pipeline(pipe, version: Version, source: ModelSource) -> SDModels:
    if version == "sdxl":
        text_encoders = [pipe.text_encoder, pipe.text_encoder_2]
        tokenizers = [pipe.tokenizer, pipe.tokenizer_2]
    else:
        text_encoders = [pipe.text_encoder]
        tokenizers = [pipe.tokenizer]
    for encoder, tokenizer in zip(text_encoders, tokenizers, strict=True):
        fix_eos_token_id(encoder, tokenizer)
    for module in (pipe.unet, pipe.vae, *text_encoders):
        module.requires_grad_(False)
        module.eval()
    return SDModels(
        version=version, unet=pipe.unet, vae=pipe.vae, text_encoders=text_encoders, tokenizers=tokenizers,
        scheduler=pipe.scheduler, source=source,
    )


def fix_eos_token_id(encoder, tokenizer) -> None:
    """Make CLIP pool at the real end-of-text position.

    Real SD checkpoints carry the legacy ``eos_token_id = 2``, with which transformers pools at the largest token id.
    New tokens get ids above end-of-text, so the pooled output (SDXL's size/text conditioning) would be read at the
    new token instead. ComfyUI and A1111 pool at end-of-text; so do we.
    """
    eos = tokenizer.eos_token_id
    if eos is None or encoder.config.eos_token_id == eos:
        return
    encoder.config.eos_token_id = eos
    # transformers 5 keeps the pooling id on the inner text model (CLIPTextModel itself, or .text_model of the
    # projection variant).
    for module in (encoder, getattr(encoder, "text_model", None)):
        if module is not None and hasattr(module, "eos_token_id"):
            module.eos_token_id = eos
