"""Masks that weight the loss and guide the crops: 255 (1.0) where the concept is, soft towards 0 elsewhere.

Which method runs:

- ``use_face_detection_instead`` → the face detector;
- else ``mask_target_prompts`` → CLIPSeg with those prompts (several separated by ``|`` or new lines: their union);
- else face mode → CLIPSeg with the prompt ``face``, as Eden's (its config sets ``mask_target_prompts = "face"``);
- else no mask (crops follow a saliency map).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod

import numpy as np
from PIL import Image

from trainer.config.schema import TrainingConfig


class Masker(ABC):
    name: str = "mask"
    input_side: int = 1024
    """Longest side of the working copy the masker looks at; masks are scaled to the image afterwards."""

    @abstractmethod
    def mask(self, image: Image.Image) -> np.ndarray:
        """float32 (height, width) in [0, 1] at the size of ``image``."""

    def close(self) -> None:  # noqa: B027 - optional hook: the face detector holds nothing to free
        """Free the model (device memory included)."""


#: The CLIPSeg prompt of face mode in Eden (trainer/config.py).
FACE_PROMPT = "face"


def mask_prompts(config: TrainingConfig) -> list[str]:
    """The CLIPSeg prompts: the ones given, else ``face`` in face mode."""
    prompts = split_prompts(config.mask_target_prompts or "")
    if not prompts and config.concept_mode == "face":
        prompts = [FACE_PROMPT]
    return prompts


def mask_method(config: TrainingConfig) -> str | None:
    if config.use_face_detection_instead:
        return "face"
    if mask_prompts(config):
        return "clipseg"
    return None


def split_prompts(text: str) -> list[str]:
    """CLIPSeg prompts: separated by ``|`` or new lines (commas belong to prompts such as "a man, smiling")."""
    return [p.strip() for p in re.split(r"[|\r\n]+", text) if p.strip()]


def create_masker(config: TrainingConfig) -> Masker | None:
    method = mask_method(config)
    # A masker's module is imported when it is chosen: each imports this package (its base class).
    if method == "face":
        # Imported when chosen (see above).
        from trainer.data.masks.faces import FaceMasker

        return FaceMasker()
    if method == "clipseg":
        # Imported when chosen (see above).
        from trainer.data.masks.clipseg import ClipSegMasker

        return ClipSegMasker.from_config(config)
    return None
