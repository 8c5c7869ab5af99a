"""Florence-2 detailed captions through transformers' native Florence2 classes."""

from __future__ import annotations

import logging

import torch
from PIL import Image

from trainer.data.aux_models import load_pretrained, release
from trainer.data.captioners.base import Captioner
from trainer.device import DeviceInfo

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "florence-community/Florence-2-large"
#: Microsoft's original repositories need remote code; these conversions load with transformers' own classes.
ALIASES = {
    "microsoft/Florence-2-base": "florence-community/Florence-2-base",
    "microsoft/Florence-2-large": "florence-community/Florence-2-large",
    "microsoft/Florence-2-base-ft": "florence-community/Florence-2-base-ft",
    "microsoft/Florence-2-large-ft": "florence-community/Florence-2-large-ft",
}
#: One or two sentences: fits CLIP's 77 tokens, unlike <MORE_DETAILED_CAPTION>'s paragraphs.
TASK = "<DETAILED_CAPTION>"
#: CLIP reads 77 tokens of a caption; more would be cut at training anyway.
MAX_NEW_TOKENS = 77


class FlorenceCaptioner(Captioner):
    name = "florence"
    batch_size = 8
    input_side = 768

    def __init__(self, model_id: str, device: DeviceInfo) -> None:
        from transformers import AutoProcessor, Florence2ForConditionalGeneration

        if model_id in ALIASES:
            logger.info("using %s, the transformers-native conversion of %s", ALIASES[model_id], model_id)
            model_id = ALIASES[model_id]
        self.device = device
        self.processor = load_pretrained(AutoProcessor.from_pretrained, model_id, "Florence-2", "caption_model_path")
        model = load_pretrained(Florence2ForConditionalGeneration.from_pretrained, model_id, "Florence-2",
                                "caption_model_path", dtype=device.dtype)
        self.model = model.to(device.device).eval()

    @torch.inference_mode()
    def caption(self, images: list[Image.Image]) -> list[str]:
        inputs = self.processor(text=[TASK] * len(images), images=images, return_tensors="pt")
        output = self.model.generate(
            input_ids=inputs["input_ids"].to(self.device.device),
            attention_mask=inputs["attention_mask"].to(self.device.device),
            pixel_values=inputs["pixel_values"].to(self.device.device, self.device.dtype),
            max_new_tokens=MAX_NEW_TOKENS,
            num_beams=3,
        )
        return self.processor.batch_decode(output, skip_special_tokens=True)

    def close(self) -> None:
        del self.model, self.processor
        release(self.device)
