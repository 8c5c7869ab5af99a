"""The invisible watermark of each family's reference scripts, applied to the predictor's final images.

The library is ``invisible-watermark`` (``imwatermark``), the one diffusers and Stability use, with its DWT-DCT
method and the reference payloads:

- SDXL: the 48 bits of Stability's SDXL scripts (diffusers' ``WATERMARK_BITS``, what ``StableDiffusionXLPipeline``
  and cog-sdxl embed);
- SD1.5: the bytes ``StableDiffusionV1``, as the original CompVis ``txt2img.py`` embeds them (diffusers' SD1.5
  pipelines embed none).

It is embedded into the 8-bit image that is delivered, after everything that changes pixels (refiner, the inpainting
composite). diffusers embeds into its float image before the 8-bit conversion, which Stability's own detector
(``scripts/demo/detect.py``: ``cv2.imread``, then count matching bits) reads back less reliably; embedding the
8-bit image is the library's documented use and what that detector reads. Like diffusers, images narrower or lower
than 256 pixels are left unmarked: the method needs that much room.
"""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

SD15_MESSAGE = b"StableDiffusionV1"
METHOD = "dwtDct"
MIN_SIDE = 256


def payload_bits(version: str) -> list[int]:
    """The watermark of ``version`` as bits, most significant first (how the library encodes bytes too)."""
    if version == "sdxl":
        from diffusers.pipelines.stable_diffusion_xl.watermark import WATERMARK_BITS

        return list(WATERMARK_BITS)
    return [int(bit) for byte in SD15_MESSAGE for bit in f"{byte:08b}"]


class Watermarker:
    """Marks RGB images with the watermark of ``version`` (``sdxl`` or ``sd15``)."""

    def __init__(self, version: str) -> None:
        try:
            from imwatermark import WatermarkEncoder
        except ImportError:
            raise RuntimeError(
                "apply_watermark needs the invisible-watermark package (pinned in requirements/nodeps.txt; install "
                "it with pip install --no-deps -r requirements/nodeps.txt), or send apply_watermark: false"
            ) from None
        self.version = version
        self._encoder = WatermarkEncoder()
        self._encoder.set_watermark("bits", payload_bits(version))

    def apply(self, images: list[Image.Image]) -> list[Image.Image]:
        marked = []
        for image in images:
            if min(image.size) < MIN_SIDE:
                logger.info("no watermark on a %dx%d image (the method needs at least %d pixels per side)",
                            *image.size, MIN_SIDE)
                marked.append(image)
                continue
            # The encoder works on 8-bit BGR, as OpenCV reads image files.
            bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
            encoded = self._encoder.encode(bgr, METHOD)
            marked.append(Image.fromarray(np.clip(encoded, 0, 255).astype(np.uint8)[:, :, ::-1]))
        return marked


def read_watermark(image: Image.Image, version: str) -> list[int]:
    """The bits at the watermark's place in an image, decoded with the same library as a detector does (8-bit BGR,
    as ``cv2.imread`` gives it). Compare them with :func:`payload_bits`."""
    from imwatermark import WatermarkDecoder

    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    return [int(bit) for bit in WatermarkDecoder("bits", len(payload_bits(version))).decode(bgr, METHOD)]
