"""Resizing and cropping to a training size, remembering what SDXL's size conditioning needs.

A crop is planned in the coordinates of the image scaled to cover the target (times an optional zoom for
augmented copies): ``crop_top_left`` is the crop's corner there, as diffusers' SDXL training scripts compute it.
Where the window can move, it goes where it keeps the most of an importance map (the mask, or saliency), and when
several positions keep it all, to the one that centres it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class CropPlan:
    target_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    """The whole image's size at the scale the crop is taken from."""
    top_left: tuple[int, int]
    """(top, left) of the crop in resized pixels (before any flip)."""
    flip: bool = False

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """(top, left) for SDXL conditioning: a mirrored crop's left edge is measured in the mirrored image."""
        top, left = self.top_left
        if self.flip:
            left = self.resized_hw[1] - left - self.target_hw[1]
        return top, left

    def box_in(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The crop as (left, top, right, bottom) in an image of ``width``×``height`` showing the whole picture."""
        sx = width / self.resized_hw[1]
        sy = height / self.resized_hw[0]
        top, left = self.top_left
        th, tw = self.target_hw
        return left * sx, top * sy, (left + tw) * sx, (top + th) * sy


def cover_size(original_hw: tuple[int, int], target_hw: tuple[int, int], zoom: float = 1.0) -> tuple[int, int]:
    oh, ow = original_hw
    th, tw = target_hw
    scale = max(tw / ow, th / oh) * zoom
    return max(th, round(oh * scale)), max(tw, round(ow * scale))


def best_offset(profile: np.ndarray, window: int, rng: np.random.Generator | None = None,
                tolerance: float = 0.0) -> int:
    """Start of the ``window`` that holds the most of ``profile``.

    Among the starts within ``tolerance`` (a fraction) of the best, ``rng`` picks one at random (augmentation);
    without it, the one that best centres the profile's mass.
    """
    n = len(profile)
    if n <= window:
        return 0
    profile = np.clip(np.nan_to_num(profile.astype(np.float64)), 0.0, None)
    total = float(profile.sum())
    if total <= 0.0:
        return (n - window) // 2 if rng is None else int(rng.integers(0, n - window + 1))
    cumulative = np.concatenate([[0.0], np.cumsum(profile)])
    sums = cumulative[window:] - cumulative[:-window]
    best = float(sums.max())
    candidates = np.flatnonzero(sums >= best * (1.0 - tolerance) - 1e-9 * total)
    if rng is not None:
        return int(rng.choice(candidates))
    centroid = float((np.arange(n) * profile).sum() / total)
    ideal = centroid - (window - 1) / 2  # the window whose middle pixel is the centroid
    return int(candidates[np.argmin(np.abs(candidates - ideal))])


def _profile(importance: np.ndarray, axis: int, length: int) -> np.ndarray:
    """Importance summed across ``axis``, resampled to ``length`` positions."""
    summed = importance.sum(axis=axis).astype(np.float64)
    if len(summed) == length:
        return summed
    source = (np.arange(len(summed)) + 0.5) / len(summed)
    target = (np.arange(length) + 0.5) / length
    return np.interp(target, source, summed)


def plan_crop(original_hw: tuple[int, int], target_hw: tuple[int, int], importance: np.ndarray | None = None, *,
              zoom: float = 1.0, flip: bool = False, rng: np.random.Generator | None = None,
              tolerance: float = 0.0) -> CropPlan:
    """Plan the crop of an ``original_hw`` image to ``target_hw``.

    ``importance`` (any resolution, same aspect as the image) steers the window; None centres it.
    """
    resized = cover_size(original_hw, target_hw, zoom)
    rh, rw = resized
    th, tw = target_hw
    if importance is None:
        if rng is None:
            top, left = (rh - th) // 2, (rw - tw) // 2
        else:
            top, left = int(rng.integers(0, rh - th + 1)), int(rng.integers(0, rw - tw + 1))
    else:
        left = best_offset(_profile(importance, 0, rw), tw, rng, tolerance)
        top = best_offset(_profile(importance, 1, rh), th, rng, tolerance)
    return CropPlan(target_hw=target_hw, resized_hw=resized, top_left=(top, left), flip=flip)


def render_image(image: Image.Image, plan: CropPlan) -> Image.Image:
    """Cut and scale the crop straight from ``image`` (any resolution) in one resampling step."""
    th, tw = plan.target_hw
    box = plan.box_in(image.width, image.height)
    out = image.resize((tw, th), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if plan.flip else out


def render_mask(mask: np.ndarray, plan: CropPlan) -> Image.Image:
    """The crop of a float [0, 1] mask (any resolution) as an L image of the target size (255 = concept)."""
    th, tw = plan.target_hw
    source = Image.fromarray(np.clip(mask * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    box = plan.box_in(source.width, source.height)
    out = source.resize((tw, th), Image.Resampling.BILINEAR, box=box)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if plan.flip else out
