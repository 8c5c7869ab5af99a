"""The settings of a checkpoint evaluation: one validated model for ``python -m trainer evaluate`` and for the
evaluation at the end of a training (the config's ``evaluation_*`` fields, whose types it shares)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from trainer.config.load import format_validation_error
from trainer.config.schema import (
    DEFAULT_CLIP_MODEL,
    MAX_GUIDANCE,
    MAX_INFERENCE_STEPS,
    MAX_RESOLUTION,
    MAX_SEED,
    ClipModel,
    EvaluationScales,
    ImagesPerPrompt,
    Location,
    Steps,
    TrainingConfig,
)
from trainer.inference.generator import SCHEDULERS

#: Every side of an evaluation image: a multiple of 8 the VAE can decode.
EvaluationSide = Annotated[int, Field(ge=8, le=MAX_RESOLUTION, multiple_of=8)]


class EvaluationSettings(BaseModel):
    """How the checkpoints of a run are rendered and scored."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, use_attribute_docstrings=True)

    lora_scales: EvaluationScales = Field(default_factory=lambda: [0.8, 1.0])
    """LoRA scales every checkpoint is evaluated at."""
    clip_model: ClipModel = DEFAULT_CLIP_MODEL
    """The CLIP model that scores: a hub id or a local folder."""
    aesthetic_weights: Optional[Location] = None
    """LAION aesthetic-predictor weights (a file or an http(s) URL); None leaves the aesthetic score out."""
    images_per_prompt: ImagesPerPrompt = 2
    """Images per prompt, per checkpoint and scale."""
    checkpoints: Optional[Annotated[list[Steps], Field(min_length=1)]] = None
    """Steps to evaluate; None: every checkpoint of the run."""
    device: Annotated[str, Field(max_length=32)] = "auto"
    weight_type: Optional[Literal["fp16", "bf16", "fp32"]] = None
    """None: the run's own weight_type."""
    steps: Optional[Annotated[int, Field(ge=1, le=MAX_INFERENCE_STEPS)]] = None
    """Denoising steps; None: the run's validation_num_inference_steps."""
    guidance: Optional[Annotated[float, Field(ge=0.0, le=MAX_GUIDANCE)]] = None
    """None: the run's validation_guidance_scale."""
    size: Optional[tuple[EvaluationSide, EvaluationSide]] = None
    """(width, height); None: the run's sample-image size."""
    n_prompts: Optional[Annotated[int, Field(ge=1)]] = None
    """Use only the first N prompts of the set; None: all."""
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = 0
    """Prompt i renders with seed + i, for every checkpoint and scale."""
    baseline: bool = True
    """Also render the base model without the LoRA (the diversity reference)."""
    training_images: Optional[Location] = None
    """A prepared dataset folder or a folder of images; None: the run's dataset/."""
    base_model: Optional[Location] = None
    """Replaces the base model named in the run (for example a local copy of it)."""
    scheduler: Literal[tuple(SCHEDULERS)] = "K_EULER"  # type: ignore[valid-type]

    @field_validator("size", mode="before")
    @classmethod
    def _size_pair(cls, value: Any) -> Any:
        if value is not None and (not isinstance(value, (list, tuple)) or len(value) != 2):
            raise ValueError(f"must be WIDTH HEIGHT, multiples of 8, got {value}")
        return value

    @classmethod
    def parse(cls, **values: Any) -> EvaluationSettings:
        """Validated settings, or a ValueError naming each bad value and its rule."""
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            raise ValueError(format_validation_error(error, cls, "Invalid evaluation settings")) from None

    @classmethod
    def from_config(cls, config: TrainingConfig, **values: Any) -> EvaluationSettings:
        """The settings a training config's ``evaluation_*`` fields give, with ``values`` (the run's device,
        sample size, steps...) on top."""
        return cls.parse(lora_scales=config.evaluation_lora_scales, clip_model=config.evaluation_clip_model,
                         aesthetic_weights=config.evaluation_aesthetic_weights,
                         images_per_prompt=config.evaluation_images_per_prompt, **values)
