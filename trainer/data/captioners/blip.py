"""BLIP image captioning (Salesforce) through transformers."""

from __future__ import annotations

import torch
from PIL import Image

from trainer.data.aux_models import load_pretrained, release
from trainer.data.captioners.base import Captioner
from trainer.device import DeviceInfo

DEFAULT_MODEL = "Salesforce/blip-image-captioning-large"
#: BLIP's captions are short; this only stops a degenerate loop.
MAX_NEW_TOKENS = 60


class BlipCaptioner(Captioner):
    name = "blip"
    batch_size = 8
    input_side = 512

    def __init__(self, model_id: str, device: DeviceInfo) -> None:
        from transformers import BlipForConditionalGeneration, BlipProcessor

        self.device = device
        self.processor = load_pretrained(BlipProcessor.from_pretrained, model_id, "BLIP", "caption_model_path")
        model = load_pretrained(BlipForConditionalGeneration.from_pretrained, model_id, "BLIP", "caption_model_path",
                                dtype=device.dtype)
        self.model = model.to(device.device).eval()

    @torch.inference_mode()
    def caption(self, images: list[Image.Image]) -> list[str]:
        inputs = self.processor(images=images, return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device.device, self.device.dtype)
        # Beam search with a repetition penalty: BLIP's greedy captions loop ("a man in a suit and a suit").
        output = self.model.generate(pixel_values=pixel_values, max_new_tokens=MAX_NEW_TOKENS, num_beams=3,
                                     repetition_penalty=1.3)
        return self.processor.batch_decode(output, skip_special_tokens=True)

    def close(self) -> None:
        del self.model, self.processor
        release(self.device)
