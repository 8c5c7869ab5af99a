"""Sample images with the trained tokens, during training and for evaluation, plus grid images."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

from trainer.data.captions import replace_trigger
from trainer.utils.atomic import atomic_path, atomic_write_text

DEFAULT_PROMPTS = {
    "face": [
        "a photo of TOK",
        "a portrait of TOK smiling, studio lighting",
        "TOK as a knight in shining armour, oil painting",
        "TOK walking on a beach at sunset",
    ],
    "object": [
        "a photo of TOK",
        "TOK on a wooden table, product photo",
        "TOK in a forest clearing",
        "a watercolour painting of TOK",
    ],
    "style": [
        "a mountain landscape, in the style of TOK",
        "a portrait of a woman, in the style of TOK",
        "a busy city street at night, in the style of TOK",
        "a cat sleeping on a sofa, in the style of TOK",
    ],
}


def sample_prompts(concept_mode: str, n: int, prompts: list[str] | None = None,
                   negatives: list[str] | None = None) -> list[tuple[str, str | None]]:
    base = prompts or DEFAULT_PROMPTS[concept_mode]
    negs = negatives or [None] * len(base)
    return [(base[i % len(base)], negs[i % len(base)]) for i in range(n)]


def image_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    if not images:
        raise ValueError("image_grid needs at least one image")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        grid.paste(image.resize((width, height)), ((index % columns) * width, (index // columns) * height))
    return grid


@torch.no_grad()
def render(pipeline, prompts: list[tuple[str, str | None]], *, trigger: str, token_string: str | None,
           size_hw: tuple[int, int], steps: int, guidance: float, lora_scale: float, seed: int,
           device: torch.device, lora_active: bool = True) -> list[Image.Image]:
    """Render one image per (prompt, negative) with a fixed seed per image (seed + index)."""
    images = []
    for index, (prompt, negative) in enumerate(prompts):
        # Without trained tokens (disable_ti) the captions name no trigger, so neither do the prompts.
        text = replace_trigger(prompt, trigger, token_string if token_string is not None else "")
        text = " ".join(text.replace(" ,", ",").split()).strip(" ,") if token_string is None else text
        generator = torch.Generator(device="cpu").manual_seed(seed + index)
        kwargs = {"cross_attention_kwargs": {"scale": lora_scale}} if lora_active else {}
        result = pipeline(
            prompt=text, negative_prompt=negative, height=size_hw[0], width=size_hw[1], num_inference_steps=steps,
            guidance_scale=guidance, generator=generator, output_type="pil", **kwargs,
        )
        images.append(result.images[0])
    return images


def save_samples(images: list[Image.Image], prompts: list[tuple[str, str | None]], folder: Path,
                 prefix: str) -> Path:
    """Save the images and their grid; returns the grid's path."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        with atomic_path(folder / f"{prefix}_{index:02d}.jpg") as tmp:
            image.save(tmp, format="JPEG", quality=92)
    atomic_write_text(folder / f"{prefix}_prompts.txt", "\n".join(p for p, _ in prompts) + "\n")
    grid_path = folder / f"{prefix}_grid.jpg"
    with atomic_path(grid_path) as tmp:
        image_grid(images).save(tmp, format="JPEG", quality=92)
    return grid_path
