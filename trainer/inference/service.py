"""What ``predict.py`` serves: a :class:`~trainer.inference.generator.Generator`, LoRAs by URL, images to files.

The base pipeline stays loaded between requests. A request's LoRA is the one named by its ``lora_url``, else the
one the predictor was started with (``COG_WEIGHTS``), else none (the plain base model). Switching deactivates the
previous LoRA completely (adapter, token vectors, swapped UNet), so a request never sees traces of another.

Inputs are validated here (:class:`PredictionInputs`), whatever the cog server did: without cog's generated schema
it passes JSON values as they were sent.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from trainer.inference.bundle import LoraBundle
from trainer.inference.generator import SCHEDULERS, GenerationRequest, Generator
from trainer.inference.remote import BundleStore, describe
from trainer.utils.download import redact_text

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
    lora_scale: float = Field(default=1.0, ge=0.0, le=2.0)
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    width: Optional[int] = Field(default=None, ge=64, le=MAX_SIDE)
    height: Optional[int] = Field(default=None, ge=64, le=MAX_SIDE)
    num_outputs: int = Field(default=1, ge=1, le=4)
    num_inference_steps: int = Field(default=30, ge=1, le=200)
    guidance_scale: float = Field(default=7.5, ge=0.0, le=30.0)
    scheduler: Literal[tuple(SCHEDULERS)] = "K_EULER"  # type: ignore[valid-type]
    seed: Optional[int] = Field(default=None, ge=0, le=2**32 - 1)
    output_format: Literal["webp", "png", "jpg"] = "webp"
    output_quality: int = Field(default=90, ge=1, le=100)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: Optional[int]) -> Optional[int]:
        if value is not None and value % 8:
            raise ValueError("must be a multiple of 8")
        return value

    @field_validator("lora_url", mode="before")
    @classmethod
    def _blank_url_is_none(cls, value):
        return None if isinstance(value, str) and not value.strip() else value

    @classmethod
    def parse(cls, values: dict) -> PredictionInputs:
        # null means "the default" (what cog sends for an optional input left empty).
        values = {k: v for k, v in values.items() if v is not None}
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            problems = []
            for item in error.errors():
                where = ".".join(str(part) for part in item["loc"]) or "input"
                message = item["msg"].removeprefix("Value error, ")
                shown = repr(item.get("input"))
                if len(shown) > 80:
                    shown = f"{shown[:60]}... ({len(shown)} characters)"
                problems.append(f"{where}: {message} (got {shown})")
            raise ValueError(redact_text("; ".join(problems))) from None


def default_weight_type(generator_device: str) -> str:
    """bf16 on accelerators (SDXL's VAE overflows in fp16), fp32 on the CPU (bf16 is slow there)."""
    from trainer.device import select_device

    return "fp32" if select_device(generator_device).type == "cpu" else "bf16"


class PredictionService:
    def __init__(self, generator: Generator, store: BundleStore, output_root: Path,
                 weights: LoraBundle | None = None) -> None:
        self.generator = generator
        self.store = store
        self.output_root = Path(output_root)
        self.weights = weights

    @classmethod
    def start(cls, weights: str | None = None, *, device: str | None = None, weight_type: str | None = None,
              root: Path | None = None) -> PredictionService:
        """Load the base model (and the ``weights`` LoRA, a URL or a local zip or folder) once, at set-up."""
        from trainer.serving.common import work_root

        device = device or os.environ.get(ENV_DEVICE, "auto")
        weight_type = weight_type or os.environ.get(ENV_WEIGHT_TYPE) or default_weight_type(device)
        root = Path(root or os.environ.get(ENV_PREDICT_DIR) or work_root() / "predict")
        from trainer.models.loading import model_cache_dir, sweep_downloads

        sweep_downloads(model_cache_dir())
        generator = Generator(device=device, weight_type=weight_type)
        from trainer.serving.common import ENV_ALLOW_LOCAL, env_flag

        # What a LoRA's training_args.json names is the request's choice: local base models only if the operator says.
        store = BundleStore(root / "loras", local_paths=env_flag(ENV_ALLOW_LOCAL))
        service = cls(generator, store, root / "outputs")
        if weights is not None and str(weights).strip():
            # COG_WEIGHTS is set by the operator (or by Replicate after a training): a local path is fine here.
            service.weights = store.get(str(weights), allow_local=True)
            generator.activate(service.weights)
            logger.info("ready with the LoRA from %s", describe(str(weights)))
        else:
            generator.load_base(_default_base(generator))
            logger.info("ready with the base model (no LoRA given at set-up)")
        return service

    def predict(self, values: dict, *, allow_local_lora: bool = False) -> list[Path]:
        inputs = PredictionInputs.parse(values)
        bundle = self._bundle_for(inputs.lora_url, allow_local_lora)
        if bundle is not None:
            self.generator.activate(bundle)
        else:
            self.generator.deactivate()
            if self.generator.pipeline is None:
                self.generator.load_base(_default_base(self.generator))
            if "TOK" in inputs.prompt:
                logger.warning("the prompt uses TOK but no LoRA is active: give lora_url (or start the predictor "
                               "with weights)")
        width, height = self._size(inputs)
        images = self.generator.generate(GenerationRequest(
            prompt=inputs.prompt, negative_prompt=inputs.negative_prompt or "", width=width, height=height,
            num_outputs=inputs.num_outputs, num_inference_steps=inputs.num_inference_steps,
            guidance_scale=inputs.guidance_scale, scheduler=inputs.scheduler, seed=inputs.seed,
            lora_scale=inputs.lora_scale,
        ))
        return self._save(images, inputs)

    # ------------------------------------------------------------------------------------------------ parts
    def _bundle_for(self, lora_url: str | None, allow_local: bool) -> LoraBundle | None:
        if lora_url:
            return self.store.get(lora_url, allow_local=allow_local)
        return self.weights

    def _size(self, inputs: PredictionInputs) -> tuple[int, int]:
        """Missing sides default to the base model's native size (1024 for SDXL, 512 for SD1.5)."""
        pipe = self.generator.pipeline
        # Never past the request bounds, whatever a model's configuration says.
        native = min(pipe.unet.config.sample_size * pipe.vae_scale_factor, MAX_SIDE)
        return inputs.width or native, inputs.height or native

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
    from trainer.models.loading import resolve_source

    return resolve_source(None, None, "sdxl", generator.cache_dir)
