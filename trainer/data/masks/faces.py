"""Face masks from OpenCV's Haar cascades, whose trained models ship inside the opencv-python wheel.

Detections are grown from the cascade's tight eyes-to-mouth box to the whole head (hair, chin, ears) and drawn as
soft ellipses. Several faces give the union; detections much smaller than the largest face are dropped as the
cascade's typical false positives in textures. No face gives a full mask, so that the image still trains evenly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from trainer.data.masks import Masker

CASCADES = ("haarcascade_frontalface_default.xml", "haarcascade_profileface.xml")
#: Detections whose side is below this fraction of the largest face's are dropped.
MIN_RELATIVE_SIZE = 0.3
#: Detection runs on a copy whose longest side is at most this (Haar cascades gain nothing from more).
DETECT_SIDE = 1024


def _cascade_dir() -> Path:
    import cv2

    folder = Path(getattr(getattr(cv2, "data", None), "haarcascades", "") or "")
    if not (folder / CASCADES[0]).is_file():
        raise RuntimeError(
            f"OpenCV's Haar cascades are missing from {folder or 'cv2.data'}: install opencv-python-headless 4.x "
            "(OpenCV 5 moved them out of the wheel)"
        )
    return folder


class FaceMasker(Masker):
    name = "face"
    input_side = DETECT_SIDE

    def __init__(self) -> None:
        import cv2

        folder = _cascade_dir()
        self._frontal = cv2.CascadeClassifier(str(folder / CASCADES[0]))
        self._profile = cv2.CascadeClassifier(str(folder / CASCADES[1]))
        self.faces_found = 0

    def detect(self, image: Image.Image) -> list[tuple[int, int, int, int]]:
        """Face boxes (x, y, width, height) in ``image`` pixels, false positives filtered."""
        import cv2

        scale = min(1.0, DETECT_SIDE / max(image.size))
        small = image if scale == 1.0 else image.resize(
            (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BILINEAR
        )
        grey = cv2.equalizeHist(np.asarray(small.convert("L")))
        min_side = max(20, int(0.04 * min(grey.shape)))
        options = {"scaleFactor": 1.1, "minNeighbors": 5, "minSize": (min_side, min_side)}
        boxes = [tuple(b) for b in self._frontal.detectMultiScale(grey, **options)]
        if not boxes:
            # The profile cascade knows faces turned one way; the mirrored image finds the other way.
            boxes = [tuple(b) for b in self._profile.detectMultiScale(grey, **options)]
            width = grey.shape[1]
            mirrored = self._profile.detectMultiScale(np.ascontiguousarray(grey[:, ::-1]), **options)
            boxes += [(width - x - w, y, w, h) for (x, y, w, h) in mirrored]
        if not boxes:
            return []
        largest = max(w for _, _, w, _ in boxes)
        kept = [b for b in boxes if b[2] >= MIN_RELATIVE_SIZE * largest]
        return [tuple(round(v / scale) for v in box) for box in kept]  # type: ignore[misc]

    def mask(self, image: Image.Image) -> np.ndarray:
        import cv2

        boxes = self.detect(image)
        if not boxes:
            return np.ones((image.height, image.width), dtype=np.float32)
        self.faces_found += 1
        mask = np.zeros((image.height, image.width), dtype=np.float32)
        for x, y, w, h in boxes:
            # Haar boxes span brows to mouth: grow to the head, a little more upwards for hair.
            centre = (int(x + w / 2), int(y + h * 0.42))
            axes = (max(1, int(w * 0.85)), max(1, int(h * 1.05)))
            cv2.ellipse(mask, centre, axes, 0, 0, 360, 1.0, thickness=-1)
        sigma = max(2.0, 0.12 * float(np.median([w for _, _, w, _ in boxes])))
        mask = cv2.GaussianBlur(mask, (0, 0), sigmaX=sigma, sigmaY=sigma)
        return np.clip(mask / max(float(mask.max()), 1e-6), 0.0, 1.0).astype(np.float32)
