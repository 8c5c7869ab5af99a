"""Soft masks from text prompts with CLIPSeg (transformers' ``CLIPSegForImageSegmentation``).

As in Replicate's cog-sdxl trainer: each prompt's logits compete in a softmax against an empty prompt, divided by
``clipseg_temperature`` (higher is softer), then a small floor is added and the map is scaled to a maximum of 1.
Several prompts give their union (pixel-wise maximum).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

from trainer.config.schema import TrainingConfig
from trainer.data.aux_models import aux_device, check_model_location, load_pretrained, release
from trainer.data.masks import Masker, mask_prompts
from trainer.device import DeviceInfo

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "CIDAS/clipseg-rd64-refined"
#: Every pixel keeps at least this weight: the background still trains a little, as in cog-sdxl.
FLOOR = 0.01


class ClipSegMasker(Masker):
    name = "clipseg"
    input_side = 512

    def __init__(self, model_id: str, prompts: list[str], temperature: float, device: DeviceInfo) -> None:
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        self.prompts = prompts
        self.temperature = temperature
        self.device = device
        self.processor = load_pretrained(CLIPSegProcessor.from_pretrained, model_id, "CLIPSeg", "clipseg_model_path")
        model = load_pretrained(CLIPSegForImageSegmentation.from_pretrained, model_id, "CLIPSeg", "clipseg_model_path",
                                dtype=device.dtype)
        self.model = model.to(device.device).eval()

    @classmethod
    def from_config(cls, config: TrainingConfig) -> ClipSegMasker:
        model_id = check_model_location(config.clipseg_model_path or DEFAULT_MODEL, "CLIPSeg", "clipseg_model_path")
        device = aux_device(config)
        prompts = mask_prompts(config)
        logger.info("loading CLIPSeg %s on %s for %s", model_id, device.device, prompts)
        return cls(model_id, prompts, config.clipseg_temperature, device)

    @torch.inference_mode()
    def probabilities(self, image: Image.Image) -> np.ndarray:
        """Per-prompt probability maps (n_prompts, h, w) at the model's resolution, before the floor and scaling."""
        texts = [*self.prompts, ""]
        inputs = self.processor(text=texts, images=[image] * len(texts), padding="max_length", truncation=True,
                                return_tensors="pt")
        logits = self.model(
            input_ids=inputs["input_ids"].to(self.device.device),
            attention_mask=inputs["attention_mask"].to(self.device.device),
            pixel_values=inputs["pixel_values"].to(self.device.device, self.device.dtype),
        ).logits.float()
        logits = logits.reshape(len(texts), *logits.shape[-2:])  # a batch of one comes back squeezed
        probs = torch.softmax(logits / self.temperature, dim=0)[:-1]
        return probs.cpu().numpy()

    def mask(self, image: Image.Image) -> np.ndarray:
        import cv2

        union = self.probabilities(image).max(axis=0)
        union = np.clip(union + FLOOR, 0.0, 1.0)
        union = union / max(float(union.max()), 1e-6)
        resized = cv2.resize(union.astype(np.float32), image.size, interpolation=cv2.INTER_LINEAR)
        return np.clip(resized, 0.0, 1.0)

    def close(self) -> None:
        del self.model, self.processor
        release(self.device)
