"""From ``lora_training_urls`` to a prepared dataset (images at their training size, captions, masks)."""

from __future__ import annotations

import logging
from pathlib import Path

from trainer.config.schema import TrainingConfig
from trainer.data.captions import place_trigger
from trainer.data.crops import resize_and_crop
from trainer.data.images import IMAGE_SUFFIXES, ImageReadError, open_image
from trainer.data.manifest import PreparedDataset, Sample
from trainer.data.sizes import fixed_training_size

logger = logging.getLogger(__name__)


def split_sources(value: str | list[str]) -> list[str]:
    """Split ``lora_training_urls`` into sources: a list, a JSON list, or text separated by |, commas or newlines."""
    import json
    import re

    if isinstance(value, list):
        items = value
    else:
        text = value.strip()
        if text.startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"lora_training_urls looks like a JSON list but does not parse: {error}") from None
            if not isinstance(items, list):
                raise ValueError("lora_training_urls as JSON must be a list of strings")
        else:
            items = re.split(r"[|\n,]", text)
    sources = [str(item).strip() for item in items if str(item).strip()]
    if not sources:
        raise ValueError("lora_training_urls is empty: give at least one URL, S3 object or local path")
    return sources


def _collect_local(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if path.is_file():
        return [path]
    raise ValueError(f"training source {source!r} is neither an existing file nor a folder")


def prepare_dataset(config: TrainingConfig, work_dir: Path, *, allow_local: bool = True) -> PreparedDataset:
    """Prepare the training set in ``work_dir/dataset`` and return it."""
    root = Path(work_dir) / "dataset"
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    target_hw = fixed_training_size(config)
    trigger = config.trigger

    files: list[Path] = []
    for source in split_sources(config.lora_training_urls):
        if "://" in source:
            raise ValueError(f"training source {source!r}: remote sources are not supported by this reader")
        if not allow_local:
            raise ValueError(f"training source {source!r}: local paths are disabled here")
        files.extend(_collect_local(source))

    samples: list[Sample] = []
    for path in files:
        try:
            image, _alpha = open_image(path)
        except ImageReadError as error:
            logger.warning("skipping %s", error)
            continue
        sidecar = path.with_suffix(".txt")
        caption = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else ""
        caption = place_trigger(caption, trigger, config.concept_mode, config.caption_prefix, config.prompt_modifier)
        cropped, _, crop_top_left = resize_and_crop(image, target_hw)
        name = f"{len(samples):04d}.png"
        cropped.save(images_dir / name)
        samples.append(
            Sample(
                image=f"images/{name}",
                caption=caption,
                target_size=target_hw,
                original_size=(image.height, image.width),
                crop_top_left=crop_top_left,
                source=str(path),
            )
        )
    if not samples:
        raise ValueError(f"no usable training images found in lora_training_urls ({config.lora_training_urls!r})")
    dataset = PreparedDataset(root=root, samples=samples, trigger=trigger, info={"n_images": len(samples)})
    dataset.save()
    logger.info("prepared %d training images at %dx%d", len(samples), target_hw[1], target_hw[0])
    return dataset
