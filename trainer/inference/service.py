"""What ``predict.py`` serves: a :class:`~trainer.inference.generator.Generator`, LoRAs by URL, images to files.

The base pipeline stays loaded between requests. A request's LoRA is the one named by its ``lora_url``, else the
one the predictor was started with (``COG_WEIGHTS``), else none (the plain base model). Switching deactivates the
previous LoRA completely (adapter, token vectors, swapped UNet), so a request never sees traces of another.

Inputs are validated here (:class:`PredictionInputs`), whatever the cog server did: without cog's generated schema
it passes JSON values as they were sent.

The inputs are cog-sdxl's: a starting ``image`` (img2img) and a ``mask`` (inpainting), the SDXL ``refine`` modes,
``apply_watermark`` and ``disable_safety_checker``. After generation the final images are watermarked, then checked:
a flagged image is replaced by a black one and reported in :class:`PredictionResult` (``predict.py`` records it as
the response's ``nsfw_outputs`` metric and the log says so), so the outputs keep their order and count.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainer.device import select_device
from trainer.inference.bundle import LoraBundle
from trainer.inference.generator import REFINE_MODES, SCHEDULERS, GenerationRequest, Generator
from trainer.inference.inputs import fetch_input, open_input_image, open_mask, output_size
from trainer.inference.remote import BundleStore, describe
from trainer.inference.safety import ENV_DISABLE_SAFETY_CHECKER, SafetyChecker, safety_checker_location
from trainer.inference.watermark import Watermarker
from trainer.models.hub import requested_models
from trainer.models.loading import model_cache_dir, resolve_source, sweep_downloads
from trainer.utils.download import redact_text
from trainer.utils.env import ENV_ALLOW_LOCAL, env_flag, work_root

logger = logging.getLogger(__name__)

ENV_DEVICE = "TRAINER_DEVICE"
ENV_WEIGHT_TYPE = "TRAINER_WEIGHT_TYPE"
ENV_PREDICT_DIR = "TRAINER_PREDICT_DIR"
OUTPUT_FORMATS = {"webp": ("WEBP", ".webp"), "png": ("PNG", ".png"), "jpg": ("JPEG", ".jpg")}
MAX_SIDE = 2048
#: CLIP reads 77 tokens; a prompt far longer than that is a mistake or an attack on the tokenizer.
MAX_PROMPT_CHARS = 2000


class PredictionInputs(BaseModel):
    """One request, validated. ``predict.py`` declares the same names, defaults and bounds for cog's schema."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    lora_url: Optional[str] = None
    lora_scale: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    image: Optional[str] = None
    mask: Optional[str] = None
    prompt_strength: float = Field(default=0.8, ge=0.0, le=1.0)
    width: Optional[int] = Field(default=None, ge=64, le=MAX_SIDE)
    height: Optional[int] = Field(default=None, ge=64, le=MAX_SIDE)
    num_outputs: int = Field(default=1, ge=1, le=4)
    num_inference_steps: int = Field(default=30, ge=1, le=200)
    guidance_scale: float = Field(default=7.5, ge=0.0, le=30.0)
    scheduler: Literal[tuple(SCHEDULERS)] = "K_EULER"  # type: ignore[valid-type]
    refine: Literal[REFINE_MODES] = "no_refiner"  # type: ignore[valid-type]
    high_noise_frac: float = Field(default=0.8, ge=0.0, le=1.0)
    refine_steps: Optional[int] = Field(default=None, ge=1, le=200)
    seed: Optional[int] = Field(default=None, ge=0, le=2**32 - 1)
    apply_watermark: bool = True
    disable_safety_checker: bool = False
    output_format: Literal["webp", "png", "jpg"] = "webp"
    output_quality: int = Field(default=90, ge=1, le=100)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: Optional[int]) -> Optional[int]:
        if value is not None and value % 8:
            raise ValueError("must be a multiple of 8")
        return value

    @field_validator("lora_url", "image", "mask", mode="before")
    @classmethod
    def _blank_url_is_none(cls, value):
        if isinstance(value, os.PathLike):
            # A cog Path (a URL that cog has not fetched keeps it as ``source``) or a plain path.
            value = getattr(value, "source", None) or os.fspath(value)
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _mask_needs_image(self) -> PredictionInputs:
        if self.mask is not None and self.image is None:
            raise ValueError("mask: inpainting needs the image to repaint too; give image with the mask")
        return self

    @classmethod
    def parse(cls, values: dict) -> PredictionInputs:
        # null means "the default" (what cog sends for an optional input left empty).
        values = {k: v for k, v in values.items() if v is not None}
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            problems = []
            for item in error.errors():
                where = ".".join(str(part) for part in item["loc"])
                message = item["msg"].removeprefix("Value error, ")
                shown = repr(item.get("input"))
                if len(shown) > 80:
                    shown = f"{shown[:60]}... ({len(shown)} characters)"
                # Whole-request rules name their inputs in the message.
                problems.append(f"{where}: {message} (got {shown})" if where else message)
            raise ValueError(redact_text("; ".join(problems))) from None


@dataclass
class PredictionResult:
    paths: list[Path]
    flagged: list[int] = field(default_factory=list)
    """Indices of the outputs the safety checker flagged (they are black images)."""
    lora_scale: float | None = None
    """The LoRA scale used (the request's, the evaluation's recommendation, or 1.0); None without a LoRA."""
    total_steps: int = 0
    """Denoising steps run, base model and refiner together."""


def default_weight_type(generator_device: str) -> str:
    """bf16 on accelerators (SDXL's VAE overflows in fp16), fp32 on the CPU (bf16 is slow there)."""
    return "fp32" if select_device(generator_device).type == "cpu" else "bf16"


class PredictionService:
    def __init__(self, generator: Generator, store: BundleStore, output_root: Path,
                 weights: LoraBundle | None = None, safety_checker=None) -> None:
        self.generator = generator
        self.store = store
        self.output_root = Path(output_root)
        self.input_root = self.output_root.parent / "inputs"
        self.weights = weights
        self.safety_checker = safety_checker
        """A :class:`~trainer.inference.safety.SafetyChecker`, or None when the operator turned it off."""
        self._watermarkers: dict = {}

    @classmethod
    def start(cls, weights: str | None = None, *, device: str | None = None, weight_type: str | None = None,
              root: Path | None = None, refiner: str | None = None,
              safety_checker: str | None = None) -> PredictionService:
        """Load the base model (and the ``weights`` LoRA, a URL or a local zip or folder) and the safety checker
        once, at set-up. ``refiner`` (else ``TRAINER_SDXL_REFINER``) and ``safety_checker`` (else
        ``TRAINER_SAFETY_CHECKER``) name those models; the refiner loads on first use."""
        device = device or os.environ.get(ENV_DEVICE, "auto")
        weight_type = weight_type or os.environ.get(ENV_WEIGHT_TYPE) or default_weight_type(device)
        root = Path(root or os.environ.get(ENV_PREDICT_DIR) or work_root() / "predict")
        sweep_downloads(model_cache_dir())
        generator = Generator(device=device, weight_type=weight_type, refiner=refiner)
        # What a LoRA's training_args.json names is the request's choice: local base models only if the operator says.
        store = BundleStore(root / "loras", local_paths=env_flag(ENV_ALLOW_LOCAL))
        checker = None
        if env_flag(ENV_DISABLE_SAFETY_CHECKER):
            logger.warning("the safety checker is off for this server (%s)", ENV_DISABLE_SAFETY_CHECKER)
        else:
            checker = SafetyChecker.load(safety_checker_location(safety_checker), cache_dir=generator.cache_dir,
                                         device=generator.device.device, dtype=generator.device.dtype)
        service = cls(generator, store, root / "outputs", safety_checker=checker)
        if weights is not None and str(weights).strip():
            # COG_WEIGHTS is set by the operator (or by Replicate after a training): a local path is fine here.
            service.weights = store.get(str(weights), allow_local=True)
            generator.activate(service.weights)
            logger.info("ready with the LoRA from %s", describe(str(weights)))
        else:
            generator.load_base(_default_base(generator))
            logger.info("ready with the base model (no LoRA given at set-up)")
        return service

    def predict(self, values: dict, *, allow_local: bool = False) -> list[Path]:
        """The output files of one request (see :meth:`run` for what else it reports)."""
        return self.run(values, allow_local=allow_local).paths

    def run(self, values: dict, *, allow_local: bool = False) -> PredictionResult:
        """One request. ``allow_local``: the request may name local files (``lora_url``, ``image``, ``mask``)."""
        inputs = PredictionInputs.parse(values)
        folder = self.input_root / uuid.uuid4().hex[:12]
        try:
            # The images first: a bad one fails before any LoRA is fetched or loaded.
            image, mask = self._images(inputs, folder, allow_local)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        bundle = self._bundle_for(inputs.lora_url, allow_local)
        if bundle is not None and inputs.refine != "no_refiner" and bundle.version != "sdxl":
            raise ValueError(f"refine: {inputs.refine} needs an SDXL base model, and this LoRA's is SD1.5; use "
                             "refine: no_refiner")
        if bundle is not None:
            # The base model that a request's LoRA names is the request's choice (the set-up LoRA's is the operator's).
            with requested_models(bundle.named_hub_models() if inputs.lora_url else {}):
                self.generator.activate(bundle)
        else:
            self.generator.deactivate()
            if self.generator.pipeline is None:
                self.generator.load_base(_default_base(self.generator))
            if "TOK" in inputs.prompt:
                logger.warning("the prompt uses TOK but no LoRA is active: give lora_url (or start the predictor "
                               "with weights)")
        scale = self._lora_scale(inputs, bundle)
        width, height = self._size(inputs, image)
        if image is not None and image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.LANCZOS)
            mask = mask.resize((width, height), Image.Resampling.LANCZOS) if mask is not None else None
        images = self.generator.generate(GenerationRequest(
            prompt=inputs.prompt, negative_prompt=inputs.negative_prompt or "", width=width, height=height,
            num_outputs=inputs.num_outputs, num_inference_steps=inputs.num_inference_steps,
            guidance_scale=inputs.guidance_scale, scheduler=inputs.scheduler, seed=inputs.seed,
            lora_scale=scale if scale is not None else 1.0, image=image, mask=mask,
            prompt_strength=inputs.prompt_strength, refine=inputs.refine, high_noise_frac=inputs.high_noise_frac,
            refine_steps=inputs.refine_steps,
        ))
        if inputs.apply_watermark:
            images = self._watermarker(self.generator.version).apply(images)
        images, flagged = self._check_safety(images, inputs)
        return PredictionResult(self._save(images, inputs), flagged, scale, self.generator.last_steps.total)

    # ------------------------------------------------------------------------------------------------ parts
    def _bundle_for(self, lora_url: str | None, allow_local: bool) -> LoraBundle | None:
        if lora_url:
            return self.store.get(lora_url, allow_local=allow_local)
        return self.weights

    def _lora_scale(self, inputs: PredictionInputs, bundle: LoraBundle | None) -> float | None:
        """The request's scale, else the one the zip's checkpoint evaluation recommends, else 1.0."""
        if bundle is None:
            return None
        if inputs.lora_scale is not None:
            return inputs.lora_scale
        recommended = bundle.recommended_lora_scale
        if recommended is not None:
            logger.info("lora_scale %g, as the checkpoint evaluation in the zip recommends", recommended)
            return recommended
        return 1.0

    def _images(self, inputs: PredictionInputs, folder: Path, allow_local: bool):
        if inputs.image is None:
            return None, None
        image = open_input_image(fetch_input(inputs.image, "image", folder, allow_local=allow_local), "image")
        mask = None
        if inputs.mask is not None:
            mask = open_mask(fetch_input(inputs.mask, "mask", folder, allow_local=allow_local), image.size, "mask")
        return image, mask

    def _size(self, inputs: PredictionInputs, image: Image.Image | None = None) -> tuple[int, int]:
        """With an image: its size (scaled down to the side limit) unless given. Without: missing sides default to
        the base model's native size (1024 for SDXL, 512 for SD1.5)."""
        if image is not None:
            return output_size(image.size, inputs.width, inputs.height, max_side=MAX_SIDE)
        pipe = self.generator.pipeline
        # Never past the request bounds, whatever a model's configuration says.
        native = min(pipe.unet.config.sample_size * pipe.vae_scale_factor, MAX_SIDE)
        return inputs.width or native, inputs.height or native

    def _watermarker(self, version: str):
        if version not in self._watermarkers:
            self._watermarkers[version] = Watermarker(version)
        return self._watermarkers[version]

    def _check_safety(self, images, inputs: PredictionInputs) -> tuple[list, list[int]]:
        if self.safety_checker is None:
            return images, []
        if inputs.disable_safety_checker:
            logger.info("safety checker skipped (disable_safety_checker)")
            return images, []
        images, flagged = self.safety_checker.filter(images)
        for index in flagged:
            logger.warning("output %d of %d was flagged by the safety checker and is a black image", index,
                           len(images))
        return images, flagged

    def _save(self, images, inputs: PredictionInputs) -> list[Path]:
        # cog has read the previous request's files by now: keep only this one's.
        if self.output_root.is_dir():
            for old in self.output_root.iterdir():
                shutil.rmtree(old, ignore_errors=True)
        folder = self.output_root / uuid.uuid4().hex[:12]
        folder.mkdir(parents=True, exist_ok=True)
        image_format, suffix = OUTPUT_FORMATS[inputs.output_format]
        paths = []
        for index, image in enumerate(images):
            path = folder / f"out-{index}{suffix}"
            options = {} if image_format == "PNG" else {"quality": inputs.output_quality}
            image.convert("RGB").save(path, format=image_format, **options)
            paths.append(path)
        return paths


def _default_base(generator: Generator):
    """The default SDXL base model (``TRAINER_SDXL_MODEL`` overrides it), for requests without a LoRA."""
    return resolve_source(None, None, "sdxl", generator.cache_dir)
