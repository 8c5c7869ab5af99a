"""The predictor's image inputs (``image``, ``mask``): fetched, opened safely and brought to the output size.

A request gives each as an http(s) URL or a data URI (what cog clients send for an uploaded file). URLs go through
the project's downloader (timeouts, retries, a size cap); data URIs are decoded under the same cap. Local paths are
read only where the operator allows them (``TRAINER_ALLOW_LOCAL_SOURCES``), as for ``lora_url``. Files are opened as
training images are (:mod:`trainer.data.images`): only raster formats, the pixel count checked before decoding, EXIF
orientation applied, colour profiles converted, transparency composited.

A mask is greyscale: white is repainted, black is kept, grey blends. Its transparent parts count as black (kept).
"""

from __future__ import annotations

import binascii
import pathlib
from pathlib import Path
from urllib.parse import unquote_to_bytes

import numpy as np
from PIL import Image

from trainer.data.images import MAX_IMAGE_PIXELS, open_image
from trainer.utils.download import download, human_size, redact_url

#: Largest image or mask file a request may send (a 120-megapixel JPEG is well below it).
MAX_INPUT_BYTES = 100 << 20
#: A mask whose channels differ by more than this somewhere is a colour image (JPEG noise in grey stays far below).
GREY_TOLERANCE = 24


def fetch_input(value, name: str, folder: Path, *, allow_local: bool) -> Path:
    """The request's ``name`` input as a local file in ``folder``."""
    # A cog URLPath (a URL that cog would download itself, without a size cap) carries the URL as ``source``.
    source = getattr(value, "source", None)
    if isinstance(source, str):
        value = source
    if isinstance(value, pathlib.PurePath):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}: expected a URL or a data URI, got {type(value).__name__}")
    value = value.strip()
    target = Path(folder) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    scheme = value.split(":", 1)[0].lower() if ":" in value else ""
    if scheme == "data":
        target.write_bytes(_decode_data_uri(value, name))
        return target
    if scheme in ("http", "https"):
        try:
            return download(value, target, max_bytes=MAX_INPUT_BYTES)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
    if "://" in value:
        raise ValueError(f"{name}: {redact_url(value)!r} is not an http(s) URL or a data URI")
    if not allow_local:
        raise ValueError(f"{name}: local paths are not accepted here; give an http(s) URL or a data URI")
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"{name}: no such file {value!r}")
    if path.stat().st_size > MAX_INPUT_BYTES:
        raise ValueError(f"{name}: {human_size(path.stat().st_size)} is over the limit of "
                         f"{human_size(MAX_INPUT_BYTES)}")
    return path


def _decode_data_uri(value: str, name: str) -> bytes:
    header, comma, payload = value[len("data:"):].partition(",")
    if not comma:
        raise ValueError(f"{name}: a data URI needs a comma before its data (data:image/png;base64,...)")
    # Base64 grows data by 4/3: refuse before decoding anything that cannot fit.
    if len(payload) > MAX_INPUT_BYTES * 4 // 3 + 4:
        raise ValueError(f"{name}: the data URI is over the limit of {human_size(MAX_INPUT_BYTES)}")
    try:
        if header.lower().endswith(";base64"):
            # Line breaks (some encoders wrap) are not data; anything else outside the alphabet is corruption.
            data = binascii.a2b_base64("".join(payload.split()), strict_mode=True)
        else:
            data = unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        raise ValueError(f"{name}: the data URI's base64 data is corrupt") from None
    if len(data) > MAX_INPUT_BYTES:
        raise ValueError(f"{name}: the data URI is over the limit of {human_size(MAX_INPUT_BYTES)}")
    if not data:
        raise ValueError(f"{name}: the data URI is empty")
    return data


def open_input_image(path: Path, name: str) -> Image.Image:
    """The image as RGB (orientation applied, transparency on white), with the training images' pixel cap."""
    return open_image(path, max_pixels=MAX_IMAGE_PIXELS, label=name).image


def open_mask(path: Path, image_size: tuple[int, int], name: str = "mask") -> Image.Image:
    """The mask as an L image (255 = repaint); it must be greyscale and as large as the image."""
    loaded = open_image(path, max_pixels=MAX_IMAGE_PIXELS, label=name)
    if loaded.image.size != tuple(image_size):
        raise ValueError(f"{name}: {loaded.image.width}×{loaded.image.height} does not match the image's "
                         f"{image_size[0]}×{image_size[1]}; give a mask of the same size")
    rgb = np.asarray(loaded.image, dtype=np.int16)
    spread = int((rgb.max(axis=2) - rgb.min(axis=2)).max())
    if spread > GREY_TOLERANCE:
        raise ValueError(f"{name}: must be greyscale (white = repaint, black = keep), but it has colours (channels "
                         f"differ by up to {spread})")
    grey = rgb.mean(axis=2)
    if loaded.alpha is not None:
        # open_image composited transparency on white; on black instead, transparent parts are kept.
        grey = grey + np.asarray(loaded.alpha, dtype=np.float32) - 255.0
    return Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8), mode="L")


def output_size(image_size: tuple[int, int], width: int | None, height: int | None, *, max_side: int,
                min_side: int = 64, multiple: int = 8) -> tuple[int, int]:
    """The output size for a starting image: ``width``/``height`` where given (one of them keeps the aspect
    ratio), else the image's size, scaled to fit ``min_side``..``max_side`` (the bounds of width and height) with
    its aspect ratio where the bounds allow; rounded to ``multiple``."""
    image_w, image_h = image_size
    if width and height:
        return width, height
    if width:
        return width, _fit(width * image_h / image_w, min_side, max_side, multiple)
    if height:
        return _fit(height * image_w / image_h, min_side, max_side, multiple), height
    scale = min(1.0, max_side / max(image_w, image_h))
    if min(image_w, image_h) * scale < min_side:
        scale = min_side / min(image_w, image_h)
    return (_fit(image_w * scale, min_side, max_side, multiple), _fit(image_h * scale, min_side, max_side, multiple))


def _fit(value: float, low: int, high: int, multiple: int) -> int:
    return int(min(high, max(low, round(value / multiple) * multiple)))


def composite(generated: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """The generated pixels where the mask is white, the original's where it is black, blended in between."""
    return Image.composite(generated.convert("RGB"), original.convert("RGB"), mask.convert("L"))
