"""Aspect-ratio buckets: training sizes of about resolution² pixels, sides multiples of 64.

The bucket list follows kohya's: for every width from ``resolution / 2`` up to ``2 × resolution`` in steps of 64,
the tallest height (a multiple of 64) that keeps the area at most resolution², plus the transposes. Each image goes
to the bucket nearest its aspect ratio (in log space, so 2:1 and 1:2 are equally far from square). Buckets too
small to fill a batch are merged into their nearest neighbour, because every batch comes from one bucket and a
bucket of one image would train at batch size 1.
"""

from __future__ import annotations

import logging
import math
from collections import Counter

from trainer.config.schema import SIZE_MULTIPLE, TrainingConfig
from trainer.data.report import PrepReport
from trainer.data.sizes import fixed_training_size, round_to_multiple

logger = logging.getLogger(__name__)

Size = tuple[int, int]  # (height, width)
#: Longest side / shortest side of the most elongated bucket.
MAX_ASPECT = 4


def bucket_sizes(resolution: int, multiple: int = SIZE_MULTIPLE) -> list[Size]:
    """All buckets (height, width) for ``resolution``, sorted by aspect ratio (width / height)."""
    area = resolution * resolution
    min_side = max(multiple, (resolution // 2) // multiple * multiple)
    max_side = max(min_side, min(area // min_side, MAX_ASPECT * min_side) // multiple * multiple)
    buckets: set[Size] = {(resolution, resolution)}
    for width in range(min_side, max_side + 1, multiple):
        height = min(max_side, (area // width) // multiple * multiple)
        if height >= min_side:
            buckets.add((height, width))
            buckets.add((width, height))
    return sorted(buckets, key=lambda hw: (hw[1] / hw[0], -hw[0] * hw[1]))


def log_aspect(hw: Size) -> float:
    return math.log(hw[1] / hw[0])


def nearest_bucket(original_hw: Size, buckets: list[Size]) -> Size:
    """The bucket whose aspect ratio is nearest (ties: the larger area, then the squarer)."""
    target = log_aspect(original_hw)
    return min(buckets, key=lambda b: (round(abs(log_aspect(b) - target), 9), -b[0] * b[1], abs(log_aspect(b))))


def merge_small_buckets(assigned: list[Size], min_count: int) -> list[Size]:
    """Move the images of buckets holding fewer than ``min_count`` into the nearest bucket in use.

    The smallest bucket goes first; it stops when every bucket in use holds ``min_count`` or only one is left.
    """
    assigned = list(assigned)
    while True:
        counts = Counter(assigned)
        small = [b for b, c in counts.items() if c < min_count]
        if not small or len(counts) == 1:
            return assigned
        victim = min(small, key=lambda b: (counts[b], -abs(log_aspect(b)), b))
        others = [b for b in counts if b != victim]
        home = min(others, key=lambda b: (abs(log_aspect(b) - log_aspect(victim)), -counts[b], b))
        assigned = [home if b == victim else b for b in assigned]


def assign_buckets(original_sizes: list[Size], resolution: int, min_per_bucket: int = 1) -> list[Size]:
    buckets = bucket_sizes(resolution)
    assigned = [nearest_bucket(size, buckets) for size in original_sizes]
    if min_per_bucket > 1:
        assigned = merge_small_buckets(assigned, min_per_bucket)
    return assigned


def training_sizes(config: TrainingConfig, original_sizes: list[Size], report: PrepReport) -> list[Size]:
    """The (height, width) each image trains at: its bucket, or the one fixed size."""
    if config.aspect_ratio_bucketing:
        if config.train_img_size or config.train_aspect_ratio:
            report.warn(
                "aspect_ratio_bucketing is off for this run: train_img_size / train_aspect_ratio fix one training size"
            )
        else:
            min_count = min(config.train_batch_size, len(original_sizes))
            assigned = assign_buckets(original_sizes, round_to_multiple(config.resolution), min_count)
            counts = Counter(assigned)
            logger.info("aspect-ratio buckets: %s", ", ".join(f"{w}x{h}: {n}" for (h, w), n in sorted(counts.items())))
            return assigned
    size = fixed_training_size(config, original_sizes)
    logger.info("training size %dx%d (width x height)", size[1], size[0])
    return [size] * len(original_sizes)
