"""Shared builders for tests: learnable synthetic images and small configs on the tiny models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainer.config.load import load_config
from trainer.config.schema import TrainingConfig
from trainer.models.loading import model_cache_dir
from trainer.models.tiny import tiny_model_dir


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
        "validation_img_size": 64,  # Eden's default (1024 / 768) is far too slow for the tiny models on a CPU
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


@torch.no_grad()
def denoising_eval(session, captions: list[str], timesteps=(150, 450, 750), seed: int = 0) -> float:
    """Mean denoising loss over the training images at fixed noise and timesteps, with the given captions."""
    from trainer.data.dataset import Batch

    n = len(session.dataset)
    batch = Batch(indices=list(range(n)), flips=[False] * n, target_size=session.dataset.target_sizes[0])
    latents, _ = session.latents.get(batch)
    unet = session.models.unet
    was_training = unet.training
    unet.eval()
    prompt_embeds, pooled = session.text.encode_ids(session.text.token_ids(captions))
    losses = []
    for t in timesteps:
        generator = torch.Generator().manual_seed(seed + t)
        noise = torch.randn(latents.shape, generator=generator)
        steps = torch.full((n,), t, dtype=torch.long)
        noisy = session.noise.scheduler.add_noise(latents, noise, steps)
        kwargs = {}
        if pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": session.time_ids[:n, 0]}
        pred = unet(noisy, steps, prompt_embeds, **kwargs).sample
        losses.append(torch.nn.functional.mse_loss(pred, noise).item())
    unet.train(was_training)
    return sum(losses) / len(losses)


def prepared_dataset(images: Path, work_dir: Path, size: int = 64, trigger: str = "TOK", mask=None):
    """A prepared dataset written directly through the manifest contract (no ingest pipeline involved).

    ``mask``: an optional function (size) -> uint8 array [size, size] giving every image the same mask.
    """
    from trainer.data.manifest import PreparedDataset, Sample

    root = work_dir / "dataset"
    (root / "images").mkdir(parents=True, exist_ok=True)
    samples = []
    for index, path in enumerate(sorted(images.glob("*.png"))):
        with Image.open(path) as image:
            original = (image.height, image.width)
            image.convert("RGB").resize((size, size), Image.Resampling.LANCZOS).save(root / "images" / f"{index}.png")
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text().strip() if caption_file.is_file() else trigger
        mask_name = None
        if mask is not None:
            mask_name = f"images/{index}_mask.png"
            Image.fromarray(mask(size)).save(root / mask_name)
        samples.append(Sample(image=f"images/{index}.png", caption=caption, target_size=(size, size),
                              original_size=original, mask=mask_name))
    dataset = PreparedDataset(root=root, samples=samples, trigger=trigger)
    dataset.save()
    return dataset


def fresh_pipeline(session):
    """A new diffusers pipeline of the tiny base model ``session`` trained on, as a user loads it from disk."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = tiny_model_dir(session.models.source.location, model_cache_dir())
    if session.models.is_sdxl:
        return StableDiffusionXLPipeline.from_pretrained(folder)
    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)

