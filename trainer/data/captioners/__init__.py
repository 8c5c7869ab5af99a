"""Captioning the images that came without captions: BLIP, Florence-2 (local models) or GPT-4V (OpenAI API)."""

from __future__ import annotations

import logging

from trainer.config.schema import TrainingConfig
from trainer.data.aux_models import aux_device, check_model_location
from trainer.data.captioners.base import Captioner
from trainer.data.limits import DataLimits

logger = logging.getLogger(__name__)


def create_captioner(config: TrainingConfig, limits: DataLimits) -> Captioner | None:
    """The captioner ``caption_model`` names (loaded now), or None for ``no_caption``."""
    kind = config.caption_model
    # Each captioner's module is imported when it is chosen: the modules import this package (its base class),
    # and each pulls in its own model code.
    if kind == "no_caption":
        return None
    if kind == "gpt4-v":
        # Imported when chosen (see above).
        from trainer.data.captioners.gpt4v import GPT4VCaptioner, OpenAIClient

        return GPT4VCaptioner(OpenAIClient.from_environment(config.caption_model_path, limits), config.concept_mode)
    device = aux_device(config)
    if kind == "blip":
        # Imported when chosen (see above).
        from trainer.data.captioners.blip import DEFAULT_MODEL, BlipCaptioner

        model_id = check_model_location(config.caption_model_path or DEFAULT_MODEL, "BLIP", "caption_model_path")
        logger.info("loading the BLIP captioner %s on %s", model_id, device.device)
        return BlipCaptioner(model_id, device)
    # Imported when chosen (see above).
    from trainer.data.captioners.florence import DEFAULT_MODEL, FlorenceCaptioner

    model_id = check_model_location(config.caption_model_path or DEFAULT_MODEL, "Florence-2", "caption_model_path")
    logger.info("loading the Florence-2 captioner %s on %s", model_id, device.device)
    return FlorenceCaptioner(model_id, device)
