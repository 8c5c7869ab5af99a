"""Where the eye goes, without a model: the spectral residual saliency of Hou & Zhang (CVPR 2007).

The log amplitude spectrum of natural images is smooth; what sticks out of its local average (the "residual")
belongs to the unexpected parts of the picture. Transformed back with the original phase, it lights up objects
against their background. This is what OpenCV contrib's ``StaticSaliencySpectralResidual`` computes, in numpy.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

#: The method works on a thumbnail: its width in pixels (as in the paper).
WORK_WIDTH = 64


def spectral_residual(image: Image.Image) -> np.ndarray:
    """Saliency in [0, 1], float32 (height, width) at the size of ``image``."""
    import cv2

    grey = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    height, width = grey.shape
    small_w = WORK_WIDTH
    small_h = max(8, round(height * WORK_WIDTH / width))
    small = cv2.resize(grey, (small_w, small_h), interpolation=cv2.INTER_AREA)
    spectrum = np.fft.fft2(small)
    log_amplitude = np.log(np.abs(spectrum) + 1e-8)
    phase = np.angle(spectrum)
    residual = log_amplitude - cv2.blur(log_amplitude, (3, 3), borderType=cv2.BORDER_REFLECT)
    saliency = np.abs(np.fft.ifft2(np.exp(residual + 1j * phase))) ** 2
    saliency = cv2.GaussianBlur(saliency.astype(np.float32), (0, 0), sigmaX=2.5)
    saliency = cv2.resize(saliency, (width, height), interpolation=cv2.INTER_LINEAR)
    saliency -= saliency.min()
    top = float(saliency.max())
    return saliency / top if top > 0 else saliency


def centre_prior(height: int, width: int, strength: float = 0.5) -> np.ndarray:
    """A broad bump that prefers the centre when the saliency map has no clear winner (photographers centre)."""
    ys = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None]
    xs = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :]
    return (1.0 - strength) + strength * np.exp(-(xs**2 + ys**2) / 0.8)


def importance_map(image: Image.Image) -> np.ndarray:
    """Saliency weighted by the centre prior: what a crop should keep when no mask says otherwise."""
    saliency = spectral_residual(image)
    return saliency * centre_prior(*saliency.shape)
