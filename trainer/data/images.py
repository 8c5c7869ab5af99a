"""Opening user images safely and normalising them to 8-bit RGB."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}

#: Refuse images above this many pixels (decompression bombs); 64 MP covers any camera.
MAX_IMAGE_PIXELS = 64_000_000


class ImageReadError(ValueError):
    """An input file that is not a usable image; the message names the file."""


def to_rgb(image: Image.Image, background=(255, 255, 255)) -> tuple[Image.Image, Image.Image | None]:
    """Convert any mode to RGB. Transparency is composited on white and returned as a mask (alpha > 0)."""
    alpha = None
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale the full range down to 8 bits instead of clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        top = array.max() if array.max() > 0 else 1.0
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("LA", "RGBA", "PA"):
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        base = Image.new("RGB", rgba.size, background)
        base.paste(rgba, mask=alpha)
        image = base
        if alpha.getextrema() == (255, 255):
            alpha = None
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image, alpha


def open_image(path: Path) -> tuple[Image.Image, Image.Image | None]:
    """Open an image file as RGB (EXIF orientation applied) plus its alpha mask if it has transparency."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with Image.open(path) as image:
            image.seek(0)  # first frame of animations
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except Image.DecompressionBombError as error:
        raise ImageReadError(f"{path.name}: image is too large ({error}); the limit is {MAX_IMAGE_PIXELS} pixels") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(f"{path.name}: not a readable image ({error})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
