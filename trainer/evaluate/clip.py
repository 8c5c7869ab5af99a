"""The CLIP model that every score is computed with, loaded once per evaluation.

Embeddings are computed in fp32 whatever the rendering precision: CLIP is small next to the diffusion model, and
the scores are compared across checkpoints at the third decimal, where half-precision rounding would show.
Images go through the PIL image processor (resize the short side, centre crop), which needs no torchvision.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from trainer.config.schema import DEFAULT_CLIP_MODEL
from trainer.models.hub import fetch_requested, requested_key

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: Images per CLIP forward pass: bounded memory for 1024 px renders on any device.
BATCH = 16


class ClipScorer:
    """Unit-length CLIP embeddings of images and texts."""

    def __init__(self, model, tokenizer, image_processor, device: torch.device, source: str):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.device = device
        self.source = source

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @classmethod
    def load(cls, source: str, device: torch.device) -> ClipScorer:
        """Load from a local folder or a hub id (the Hugging Face cache, as for the other helper models)."""
        from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

        key = requested_key(source)
        if key is not None:
            # A request's choice: fetched under the rules for requests, then read from that folder only.
            from trainer.models.loading import model_cache_dir

            location = str(fetch_requested(source.strip(), key, model_cache_dir(), "transformers"))
        else:
            location = _check_location(source)
        try:
            model = CLIPModel.from_pretrained(location, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(location)
            image_processor = CLIPImageProcessorPil.from_pretrained(location)
        # Missing files, no network and a folder of another model surface as any of these inside transformers.
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            raise ValueError(
                f"could not load the CLIP model {source!r} ({first_line}). Give a local folder holding a "
                f"transformers CLIPModel with its tokenizer and image processor, or a hub id; without network, "
                f"download it once (huggingface-cli download {DEFAULT_CLIP_MODEL}) and run with HF_HUB_OFFLINE=1"
            ) from None
        model.requires_grad_(False)
        model.eval()
        model.to(device)
        logger.info("CLIP scorer: %s (%d-d embeddings)", source, model.config.projection_dim)
        return cls(model, tokenizer, image_processor, device, source)

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """(N, D) float32 unit vectors on the CPU."""
        if not images:
            raise ValueError("no images to embed")
        chunks = []
        for start in range(0, len(images), BATCH):
            batch = [image.convert("RGB") for image in images[start : start + BATCH]]
            pixels = self.image_processor(images=batch, return_tensors="pt")["pixel_values"]
            output = self.model.get_image_features(pixel_values=pixels.to(self.device, torch.float32))
            chunks.append(_features(output).float().cpu())
        return F.normalize(torch.cat(chunks), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """(N, D) float32 unit vectors on the CPU; texts beyond CLIP's 77 tokens are truncated."""
        if not texts:
            raise ValueError("no texts to embed")
        chunks = []
        for start in range(0, len(texts), BATCH):
            tokens = self.tokenizer(texts[start : start + BATCH], padding=True, truncation=True,
                                    max_length=self.model.config.text_config.max_position_embeddings,
                                    return_tensors="pt")
            output = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                  attention_mask=tokens["attention_mask"].to(self.device))
            chunks.append(_features(output).float().cpu())
        return F.normalize(torch.cat(chunks), dim=-1)


def _features(output) -> torch.Tensor:
    # transformers 5 returns the projected embedding as pooler_output of a model output; older versions a tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _check_location(source: str) -> str:
    if not source or not source.strip():
        raise ValueError(f"the CLIP model is empty: give a hub id (default {DEFAULT_CLIP_MODEL}) or a local folder")
    expanded = Path(os.path.expanduser(source.strip()))
    if expanded.is_dir():
        if not (expanded / "config.json").is_file():
            raise ValueError(f"the CLIP model folder {source!r} has no config.json: it is not a transformers model "
                             "folder (save one with CLIPModel.save_pretrained plus its processor)")
        return str(expanded)
    if _HUB_ID.match(source.strip()) and not source.startswith((".", "/", "~")):
        return source.strip()
    raise ValueError(f"the CLIP model {source!r} is neither an existing folder nor a hub id (org/name)")
