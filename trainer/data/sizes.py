"""Training sizes: one fixed size, or aspect-ratio buckets of about resolution² pixels."""

from __future__ import annotations

from trainer.config.schema import SIZE_MULTIPLE, TrainingConfig


def round_to_multiple(value: float, multiple: int = SIZE_MULTIPLE) -> int:
    return max(multiple, round(value / multiple) * multiple)


def size_for_aspect(resolution: int, aspect: float, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """(height, width) with about resolution² pixels, width / height near ``aspect``, sides multiples of 64."""
    width = round_to_multiple(resolution * aspect**0.5, multiple)
    height = round_to_multiple(resolution / aspect**0.5, multiple)
    return height, width


def fixed_training_size(config: TrainingConfig) -> tuple[int, int]:
    """(height, width) when every image trains at one size."""
    if config.train_img_size:
        size = config.train_img_size
        width, height = (size[0], size[0]) if len(size) == 1 else (size[0], size[1])
        return height, width
    if config.train_aspect_ratio:
        return size_for_aspect(config.resolution, config.train_aspect_ratio)
    return config.resolution, config.resolution
