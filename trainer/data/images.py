"""Opening user images safely and normalising them to 8-bit sRGB.

- Only raster formats that photos and drawings come in are parsed (JPEG/MPO, PNG, WebP, BMP, TIFF, GIF, and
  HEIC/HEIF/AVIF where the plugins are present); Pillow's other parsers (EPS runs Ghostscript) never see user bytes.
- The pixel count is checked from the header, before any pixel is decoded (decompression bombs).
- EXIF orientation is applied, the first frame of animations is used, embedded ICC profiles (Display P3 phone
  photos, CMYK print files) are converted to sRGB.
- Transparency: the image is composited on a white background, and its alpha channel is returned as a mask
  (255 = opaque) that preparation uses as the sample's mask, so transparent areas do not count in the loss.
- Palette, grey, 16-bit and float images are converted by value range, not clipped.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps

from trainer.data.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".heic", ".heif", ".avif"}

#: Refuse images above this many pixels (decompression bombs); see DataLimits.max_image_pixels.
MAX_IMAGE_PIXELS = 120_000_000

_BASE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "DIB", "TIFF", "GIF")
_heif_checked = False


class ImageReadError(DataError):
    """An input file that is not a usable image; the message names the file."""


@dataclass
class LoadedImage:
    image: Image.Image
    """RGB, 8 bits per channel, orientation applied (reduced when the caller asked for a smaller copy)."""
    alpha: Image.Image | None
    """L-mode opacity (255 = opaque) when the file had real transparency, else None."""
    format: str
    full_size: tuple[int, int] = (0, 0)
    """(width, height) of the picture at full resolution, orientation applied."""


def _register_optional_formats() -> tuple[str, ...]:
    """Formats from optional plugins: HEIC/HEIF through pillow-heif, AVIF through Pillow itself (11.2+)."""
    global _heif_checked
    if not _heif_checked:
        _heif_checked = True
        try:
            import pillow_heif  # type: ignore[import-not-found]

            pillow_heif.register_heif_opener()
        except ImportError:
            logger.debug("pillow-heif is not installed: HEIC images are skipped")
    Image.init()
    return tuple(f for f in ("HEIF", "AVIF") if f in Image.OPEN)


def allowed_formats() -> tuple[str, ...]:
    optional = _register_optional_formats()
    # MPO (multi-picture camera JPEGs) opens through the JPEG entry; names Pillow lacks are left out.
    return tuple(f for f in _BASE_FORMATS if f in Image.OPEN) + optional


# ---------------------------------------------------------------------------------------------- conversions
def _high_bit_to_l(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit int and float greyscale to 8 bits, by the range the type implies.

    The scaling runs over bands of rows (about a megapixel each): a whole-image float64 copy would take 8 bytes per
    pixel several times over (a 110 MP 16-bit PNG took 3.5 GiB), a band a few MiB.
    """
    array = np.asarray(image)
    low = 0.0
    if image.mode == "F":
        top = max((float(np.nanmax(band)) for band in _bands(array) if band.size and not np.isnan(band).all()),
                  default=1.0)
        scale = 255.0 if top <= 1.0 else (1.0 if top <= 255.0 else 255.0 / top)
    elif image.mode.startswith("I;16") or (array.size and array.max() <= 65535 and array.min() >= 0):
        scale = 255.0 / 65535.0  # 16-bit data (PNG/TIFF open as I;16 or I): full range, not clipped at 255
    else:
        low, top = float(array.min()), float(array.max())
        scale = 255.0 / max(top - low, 1.0)
    out = np.empty(array.shape, dtype=np.uint8)
    rows = _band_rows(array)
    for start in range(0, array.shape[0], rows):
        band = array[start:start + rows].astype(np.float64)
        if low:
            band -= low
        band *= scale
        np.nan_to_num(band, copy=False)
        np.clip(band, 0, 255, out=band)
        out[start:start + rows] = np.round(band)
    return Image.fromarray(out, mode="L")


def _band_rows(array: np.ndarray) -> int:
    return max(1, (1 << 20) // max(1, array.shape[1] if array.ndim > 1 else 1))


def _bands(array: np.ndarray):
    rows = _band_rows(array)
    for start in range(0, array.shape[0], rows):
        yield array[start:start + rows]


def _to_srgb(image: Image.Image) -> Image.Image:
    """Apply an embedded ICC profile (CMYK, Display P3, Adobe RGB) so colours match what the user saw."""
    icc = image.info.get("icc_profile")
    if not icc or image.mode not in ("RGB", "RGBA", "CMYK", "L", "LA"):
        return image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        target_mode = "RGBA" if image.mode in ("RGBA", "LA") else "RGB"
        if image.mode == "LA":
            image = image.convert("RGBA")
        if _is_srgb(source) and image.mode == target_mode:
            return image
        srgb = ImageCms.createProfile("sRGB")
        converted = ImageCms.profileToProfile(image, source, srgb, outputMode=target_mode)
        return converted if converted is not None else image
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as error:
        logger.debug("ignoring an unusable ICC profile (%s)", error)
        return image


def _is_srgb(profile: ImageCms.ImageCmsProfile) -> bool:
    try:
        return ImageCms.getProfileDescription(profile).strip().lower().startswith("srgb")
    except ImageCms.PyCMSError:
        return False


def to_rgb(image: Image.Image, background=(255, 255, 255)) -> tuple[Image.Image, Image.Image | None]:
    """Convert any mode to RGB. Transparency is composited on ``background`` and returned as an L mask."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _high_bit_to_l(image)
    elif image.mode == "1":
        image = image.convert("L")
    elif image.mode in ("P", "PA"):
        has_alpha = image.mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
    elif image.mode == "La":
        image = image.convert("LA")
    elif image.mode == "RGBa":
        image = image.convert("RGBA")
    image = _to_srgb(image)
    alpha = None
    if image.mode in ("LA", "RGBA"):
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        image = Image.alpha_composite(base, rgba).convert("RGB")
        if alpha.getextrema()[0] == 255:
            alpha = None  # an alpha channel with nothing transparent is no mask
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image, alpha


# ---------------------------------------------------------------------------------------------------- opening
def _reduce(image: Image.Image, target: tuple[int, int], gap: float) -> Image.Image:
    """``image`` shrunk by the largest whole factor that keeps it at least ``gap`` times ``target`` (both sides), as
    Pillow's own ``reducing_gap`` does: box averages, before any colour conversion sees the full frame."""
    factor = int(min(image.width / max(target[0], 1), image.height / max(target[1], 1)) / gap)
    if factor < 2:
        return image
    if image.mode in ("1", "P", "PA"):
        return image  # palettes cannot be averaged; these modes take one byte per pixel or less
    size = (image.width // factor, image.height // factor)
    if image.mode.startswith("I;16"):
        return image.resize(size, Image.Resampling.BOX, box=(0, 0, size[0] * factor, size[1] * factor))
    return image.reduce(factor)


def open_image(path: Path, *, max_pixels: int = MAX_IMAGE_PIXELS, label: str | None = None,
               draft_size: tuple[int, int] | None = None, reduce_to: tuple[int, int] | None = None,
               reduce_gap: float = 2.0) -> LoadedImage:
    """Open an image file as RGB (orientation applied) plus its alpha mask when it has transparency.

    ``draft_size`` (width, height) lets JPEG decode directly at a reduced scale of at least that size, which is
    much faster for working copies. ``reduce_to`` (width, height) shrinks the decoded frame by whole factors while it
    stays ``reduce_gap`` times larger, before any conversion: the conversions then never hold a second full-size
    copy. Raises :class:`ImageReadError` naming ``label`` (default: the file name).

    Memory: the frame is decoded once, at most 4 bytes per pixel whatever the bit depth (16-bit and float data are
    scaled to 8 bits in bands of a megapixel), and at most ``max_pixels``; the rest works on the reduced copy.
    """
    name = label or Path(path).name
    try:
        with warnings.catch_warnings():
            # The explicit pixel check below replaces Pillow's global, process-wide one.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=allowed_formats()) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageReadError(
                        f"{name}: {width}×{height} pixels ({width * height / 1e6:.0f} MP) is over the limit of "
                        f"{max_pixels / 1e6:.0f} MP; downscale it"
                    )
                if width < 1 or height < 1:
                    raise ImageReadError(f"{name}: the image has no pixels")
                fmt = image.format or "?"
                if draft_size is not None and fmt in ("JPEG", "MPO"):
                    image.draft("RGB", draft_size)
                image.seek(0)  # first frame of animations and multi-page files
                image.load()
                turned = _orientation(image) in (5, 6, 7, 8)
                full_size = (height, width) if turned else (width, height)
                if reduce_to is not None:
                    # Before the orientation: turning a full frame would copy it.
                    image = _reduce(image, reduce_to[::-1] if turned else reduce_to, reduce_gap)
                image = _apply_orientation(image)
                rgb, alpha = to_rgb(image)
    except ImageReadError:
        raise
    except Image.DecompressionBombError:
        # Pillow's own guard (at twice its MAX_IMAGE_PIXELS) fired while reading the header: far over our limit too.
        raise ImageReadError(
            f"{name}: the image is over the limit of {max_pixels / 1e6:.0f} MP (a decompression bomb?); downscale it"
        ) from None
    except Image.UnidentifiedImageError:
        raise ImageReadError(f"{name}: not an image in a supported format") from None
    except MemoryError:
        raise ImageReadError(f"{name}: not enough memory to decode it") from None
    except Exception as error:
        reason = str(error).strip() or type(error).__name__
        raise ImageReadError(f"{name}: the image is truncated or corrupt ({reason[:120]})") from None
    return LoadedImage(rgb, alpha, fmt, full_size)


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1) or 1)
    except Exception:  # an unreadable EXIF block: no orientation
        return 1


def _apply_orientation(image: Image.Image) -> Image.Image:
    if _orientation(image) == 1:
        return image  # exif_transpose would return a full copy of an upright frame
    try:
        return ImageOps.exif_transpose(image)
    except Exception as error:
        logger.debug("ignoring unreadable EXIF orientation (%s)", error)
        return image


def oriented_size(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header only."""
    with Image.open(path, formats=allowed_formats()) as image:
        width, height = image.size
        try:
            orientation = image.getexif().get(0x0112, 1)
        except Exception:
            orientation = 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)
