"""Augmented copies until the dataset holds ``augment_imgs_up_to_n`` images, reproducible from the seed.

Copies go round-robin over the images in a seeded order, so every image gets as many copies as any other, plus or
minus one. A copy is a zoomed-in crop at a random position that still keeps the mask or the salient region, and, in
the first round, a mirror image when flips are allowed (never in face mode: faces are not symmetric). The trainer's
own random flips at train time come on top.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Zoom range of copies; the first, mirrored round zooms less because the mirror already makes it new.
ZOOM_MIRRORED = (1.0, 1.15)
ZOOM_PLAIN = (1.1, 1.35)
#: A copy's window may keep this much less of the importance map than the best window.
TOLERANCE = 0.15


@dataclass(frozen=True)
class AugmentView:
    source: int
    """Index of the image this copies."""
    zoom: float
    flip: bool
    seed: int
    """Seeds the random crop position of this copy."""

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


def flips_allowed(concept_mode: str, left_right_flip_augmentation: bool) -> bool:
    return left_right_flip_augmentation and concept_mode != "face"


def plan_augmentation(n_images: int, target_n: int, *, seed: int, allow_flip: bool) -> list[AugmentView]:
    """The copies to add to ``n_images`` images to reach ``target_n`` (none when there are enough)."""
    if n_images <= 0 or target_n <= n_images:
        return []
    rng = np.random.default_rng([seed, 0x5EED])
    views: list[AugmentView] = []
    n_copies = target_n - n_images
    round_index = 0
    while len(views) < n_copies:
        mirrored = allow_flip and round_index % 2 == 0
        low, high = ZOOM_MIRRORED if mirrored else ZOOM_PLAIN
        for source in rng.permutation(n_images):
            if len(views) == n_copies:
                break
            views.append(AugmentView(
                source=int(source),
                zoom=float(rng.uniform(low, high)),
                flip=mirrored,
                seed=int(rng.integers(0, 2**31 - 1)),
            ))
        round_index += 1
    return sorted(views, key=lambda v: v.source)
