"""Resizing and cropping to a training size, remembering what SDXL's size conditioning needs."""

from __future__ import annotations

from PIL import Image


def resize_to_cover(image: Image.Image, target_hw: tuple[int, int]) -> Image.Image:
    """Scale so that the image covers ``target_hw`` with the least cropping."""
    target_h, target_w = target_hw
    scale = max(target_w / image.width, target_h / image.height)
    new_w = max(target_w, round(image.width * scale))
    new_h = max(target_h, round(image.height * scale))
    return image.resize((new_w, new_h), Image.Resampling.LANCZOS)


def crop_box(size_wh: tuple[int, int], target_hw: tuple[int, int],
             focus_xy: tuple[float, float] | None = None) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a ``target_hw`` window centred on ``focus_xy`` (default: the centre)."""
    width, height = size_wh
    target_h, target_w = target_hw
    cx, cy = focus_xy if focus_xy is not None else (width / 2, height / 2)
    left = int(round(min(max(cx - target_w / 2, 0), width - target_w)))
    top = int(round(min(max(cy - target_h / 2, 0), height - target_h)))
    return left, top, left + target_w, top + target_h


def resize_and_crop(image: Image.Image, target_hw: tuple[int, int],
                    focus_xy: tuple[float, float] | None = None,
                    mask: Image.Image | None = None) -> tuple[Image.Image, Image.Image | None, tuple[int, int]]:
    """Resize to cover ``target_hw`` and crop around ``focus_xy`` (given in source pixels).

    Returns the image, the mask cropped alike, and the crop's (top, left) in resized pixels.
    """
    resized = resize_to_cover(image, target_hw)
    if focus_xy is not None:
        sx, sy = resized.width / image.width, resized.height / image.height
        focus_xy = (focus_xy[0] * sx, focus_xy[1] * sy)
    box = crop_box(resized.size, target_hw, focus_xy)
    cropped = resized.crop(box)
    cropped_mask = None
    if mask is not None:
        cropped_mask = mask.resize(resized.size, Image.Resampling.BILINEAR).crop(box)
    return cropped, cropped_mask, (box[1], box[0])
