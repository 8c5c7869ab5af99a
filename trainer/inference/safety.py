"""The Stable Diffusion safety checker on the predictor's outputs: flagged images become black and are reported.

The model is diffusers' :class:`StableDiffusionSafetyChecker` with its CLIP image processor, the one cog-sdxl and
diffusers' SD1.5 pipelines run (``CompVis/stable-diffusion-safety-checker``). ``TRAINER_SAFETY_CHECKER`` names
another (a hub id or a local folder; ``tiny-safety-checker`` is the offline test fixture, used only when named);
hub downloads go to the model cache like the base models. ``TRAINER_DISABLE_SAFETY_CHECKER=1`` turns it off for the
whole server: nothing is loaded and no output is checked.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from PIL import Image

from trainer.models.loading import HUB_ID
from trainer.models.tiny import TINY_SAFETY_CHECKER, tiny_model_dir

logger = logging.getLogger(__name__)

DEFAULT_SAFETY_CHECKER = "CompVis/stable-diffusion-safety-checker"
ENV_SAFETY_CHECKER = "TRAINER_SAFETY_CHECKER"
ENV_DISABLE_SAFETY_CHECKER = "TRAINER_DISABLE_SAFETY_CHECKER"


def safety_checker_location(configured: str | None = None) -> str:
    return (configured or os.environ.get(ENV_SAFETY_CHECKER) or DEFAULT_SAFETY_CHECKER).strip()


class SafetyChecker:
    def __init__(self, model, image_processor, device: torch.device, source: str) -> None:
        self.model = model
        self.image_processor = image_processor
        self.device = device
        self.source = source

    @classmethod
    def load(cls, location: str, *, cache_dir: Path, device: torch.device, dtype: torch.dtype) -> SafetyChecker:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessorPil

        folder = location
        extra = {}
        if location == TINY_SAFETY_CHECKER:
            folder = str(tiny_model_dir(location, cache_dir))
        elif Path(location).expanduser().is_dir():
            folder = str(Path(location).expanduser())
        elif HUB_ID.match(location):
            extra = {"cache_dir": str(Path(cache_dir) / "hub")}
        else:
            raise ValueError(f"{ENV_SAFETY_CHECKER} {location!r} is not a local folder or a hub id (org/name)")
        try:
            model = StableDiffusionSafetyChecker.from_pretrained(folder, dtype=dtype, **extra)
            # No torchvision here: the PIL processor resizes and crops exactly as the default one would.
            image_processor = CLIPImageProcessorPil.from_pretrained(folder, **extra)
        except (OSError, ValueError) as error:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            raise ValueError(
                f"could not load the safety checker {location!r} ({first_line}). Set {ENV_SAFETY_CHECKER} to a local "
                f"folder or a reachable hub id, or {ENV_DISABLE_SAFETY_CHECKER}=1 to run without it"
            ) from None
        model.requires_grad_(False)
        model.eval()
        model.to(device)
        logger.info("safety checker ready: %s", location)
        return cls(model, image_processor, device, location)

    @torch.no_grad()
    def flags(self, images: list[Image.Image]) -> list[bool]:
        """Whether each image shows a concept the checker flags."""
        import numpy as np

        rgb = [image.convert("RGB") for image in images]
        pixels = self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]
        dtype = next(self.model.parameters()).dtype
        arrays = [np.asarray(image) for image in rgb]
        _, flagged = self.model(clip_input=pixels.to(self.device, dtype), images=arrays)
        return [bool(flag) for flag in flagged]

    def filter(self, images: list[Image.Image]) -> tuple[list[Image.Image], list[int]]:
        """The images with every flagged one replaced by a black image of its size, and the flagged indices."""
        flagged = [index for index, flag in enumerate(self.flags(images)) if flag]
        result = [Image.new("RGB", image.size) if index in flagged else image for index, image in enumerate(images)]
        return result, flagged
