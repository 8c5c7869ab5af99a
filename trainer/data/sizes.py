"""Training sizes: one fixed size, or aspect-ratio buckets of about resolution² pixels."""

from __future__ import annotations

from collections.abc import Sequence

from trainer.config.schema import SIZE_MULTIPLE, TrainingConfig


def round_to_multiple(value: float, multiple: int = SIZE_MULTIPLE) -> int:
    return max(multiple, round(value / multiple) * multiple)


def size_for_aspect(resolution: int, aspect: float, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """(height, width) with about resolution² pixels, width / height near ``aspect``, sides rounded to the nearest
    multiple of 64. This is Eden's ``calculate_new_dimensions`` (trainer/preprocess.py): width √(res² · aspect),
    height res² / width, each rounded on its own (Python's round, halves to even)."""
    width = (resolution * resolution * aspect) ** 0.5
    height = resolution * resolution / width
    return round_to_multiple(height, multiple), round_to_multiple(width, multiple)


def mean_aspect(original_sizes: Sequence[tuple[int, int]]) -> float:
    """Eden's average aspect ratio: the mean of width / height over the images (after EXIF orientation)."""
    return sum(w / h for h, w in original_sizes) / len(original_sizes)


def fixed_training_size(config: TrainingConfig, original_sizes: Sequence[tuple[int, int]] = ()) -> tuple[int, int]:
    """(height, width) when every image trains at one size: ``train_img_size``, else ``train_aspect_ratio``, else
    (Eden's rule) the mean aspect ratio of the images, at about resolution² pixels."""
    if config.train_img_size:
        size = config.train_img_size
        width, height = (size[0], size[0]) if len(size) == 1 else (size[0], size[1])
        return height, width
    if config.train_aspect_ratio:
        return size_for_aspect(config.resolution, config.train_aspect_ratio)
    return size_for_aspect(config.resolution, mean_aspect(original_sizes) if original_sizes else 1.0)


#: Eden's sample size when ``validation_img_size`` is unset (main.py): 1024 for SDXL, 768 for SD1.5.
EDEN_SAMPLE_SIDE = {"sdxl": 1024, "sd15": 768}
#: Eden's LoRA scale of the sample images when ``sample_imgs_lora_scale`` is unset or 0 (main.py).
EDEN_SAMPLE_LORA_SCALE = {"sdxl": 0.75, "sd15": 0.85}


def sample_size(validation_img_size: int | list[int] | None, version: str,
                train_hw: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the sample images, by Eden's rule (main.py, trainer/preprocess.py): ``[width, height]``
    as given, an int (or the model's default side) as about side² pixels at the training aspect ratio; every side
    rounded to the nearest multiple of 64."""
    if isinstance(validation_img_size, (list, tuple)):
        return round_to_multiple(validation_img_size[1]), round_to_multiple(validation_img_size[0])
    side = validation_img_size or EDEN_SAMPLE_SIDE[version]
    train_h, train_w = train_hw
    return size_for_aspect(side, train_w / train_h)


def sample_lora_scale(configured: float | None, version: str) -> float:
    return configured or EDEN_SAMPLE_LORA_SCALE[version]
