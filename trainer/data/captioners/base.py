"""The captioner interface shared by the local models and the OpenAI API."""

from __future__ import annotations

from abc import ABC, abstractmethod

from PIL import Image


class Captioner(ABC):
    name: str = "captioner"
    batch_size: int = 8
    """Images per call of :meth:`caption`."""
    input_side: int = 768
    """Longest side the images need to have (working copies are decoded at about this size)."""

    @abstractmethod
    def caption(self, images: list[Image.Image]) -> list[str]:
        """One raw caption per image, in order."""

    def close(self) -> None:  # noqa: B027 - optional hook: API captioners hold nothing to free
        """Free the model (device memory included)."""
