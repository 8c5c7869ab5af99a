"""Shared builders for tests: learnable synthetic images and small configs on the tiny models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainer.config import TrainingConfig, load_config


def make_concept_images(folder: Path, n: int = 4, size: int = 96, seed: int = 0, captions: bool = True) -> Path:
    """A recognisable 'concept': a red disc with a yellow stripe on varied blue-green backgrounds."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size]
    for index in range(n):
        background = np.array([rng.integers(0, 80), rng.integers(80, 200), rng.integers(120, 255)], dtype=np.float32)
        image = np.ones((size, size, 3), dtype=np.float32) * background
        cx, cy = rng.integers(size // 3, 2 * size // 3, size=2)
        radius = size // 4
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < radius**2
        image[disc] = [220, 30, 30]
        image[disc & (np.abs(yy - cy) < radius // 4)] = [240, 220, 40]
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / f"img_{index:02d}.png")
        if captions:
            (folder / f"img_{index:02d}.txt").write_text("a TOK on a plain background", encoding="utf-8")
    return folder


def tiny_config(images: Path, output_dir: Path, model: str = "tiny-sdxl", **overrides) -> TrainingConfig:
    base = {
        "lora_training_urls": str(images),
        "concept_mode": "object",
        "ckpt_path": model,
        "caption_model": "no_caption",
        "resolution": 64,
        "train_batch_size": 2,
        "max_train_steps": 12,
        "checkpointing_steps": 0,
        "n_sample_imgs": 0,
        "validation_num_inference_steps": 2,
        "device": "cpu",
        "weight_type": "fp32",
        "seed": 1234,
        "output_dir": str(output_dir),
        "lora_rank": 4,
        "n_tokens": 2,
        "logging_steps": 4,
    }
    base.update(overrides)
    return load_config(base)


def frozen_snapshot(session) -> dict[str, torch.Tensor]:
    """Copies of every pretrained weight: UNet base layers, VAE, text encoders and their token tables."""
    snapshot = {}
    modules = {"unet": session.models.unet, "vae": session.models.vae}
    modules.update({f"te{i}": e for i, e in enumerate(session.models.text_encoders)})
    for prefix, module in modules.items():
        for name, value in module.state_dict().items():
            if "lora_" in name or name.endswith(".new"):
                continue
            snapshot[f"{prefix}.{name}"] = value.detach().clone()
    return snapshot
