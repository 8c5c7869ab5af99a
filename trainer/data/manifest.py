"""The prepared dataset: the contract between data preparation and training.

Preparation (``trainer.data.prepare``) turns the user's sources into images already cropped and resized to their
training size, with captions and optional masks, and writes ``manifest.json`` beside them. Training reads only this
manifest, so the two sides stay independent and a prepared dataset can be inspected or reused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trainer.utils.atomic import atomic_write_text

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Sample:
    """One training image as prepared."""

    image: str
    """Path of the RGB image, relative to the dataset root, already at ``target_size``."""
    caption: str
    """Caption with the trigger word (for example ``TOK``) in place; the trainer maps it to the new tokens."""
    target_size: tuple[int, int]
    """(height, width) the image is trained at; every batch holds one target size."""
    original_size: tuple[int, int]
    """(height, width) of the source image before cropping and resizing (SDXL size conditioning)."""
    crop_top_left: tuple[int, int] = (0, 0)
    """(top, left) of the crop in source-image pixels scaled to the resized image (SDXL crop conditioning)."""
    mask: str | None = None
    """Path of a greyscale mask (255 = concept) of the same size as the image, or None."""
    source: str = ""
    """Where the image came from, for messages (URL or archive member, without credentials)."""
    augmented: bool = False
    """True for copies added by augmentation."""
    resized_size: tuple[int, int] | None = None
    """(height, width) of the whole image at the scale the crop was taken from (None in older manifests). A
    trainer that mirrors the crop at train time needs it for SDXL's crop conditioning: the mirrored crop's left is
    ``resized_width - left - target_width``."""


@dataclass
class PreparedDataset:
    root: Path
    samples: list[Sample]
    trigger: str = "TOK"
    info: dict = field(default_factory=dict)
    """Free-form facts about the preparation (caption model, counts, warnings) kept in the manifest."""

    def __len__(self) -> int:
        return len(self.samples)

    def image_path(self, index: int) -> Path:
        return self.root / self.samples[index].image

    def mask_path(self, index: int) -> Path | None:
        mask = self.samples[index].mask
        return self.root / mask if mask else None

    @property
    def has_masks(self) -> bool:
        return any(sample.mask for sample in self.samples)

    @property
    def target_sizes(self) -> list[tuple[int, int]]:
        return sorted({tuple(s.target_size) for s in self.samples})

    def save(self) -> Path:
        payload = {
            "version": MANIFEST_VERSION,
            "trigger": self.trigger,
            "info": self.info,
            "samples": [asdict(sample) for sample in self.samples],
        }
        path = self.root / MANIFEST_NAME
        atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, root: Path) -> PreparedDataset:
        root = Path(root)
        path = root / MANIFEST_NAME
        if not path.is_file():
            raise ValueError(f"{root} is not a prepared dataset: {MANIFEST_NAME} is missing")
        payload = json.loads(path.read_text(encoding="utf-8"))
        samples = []
        for raw in payload["samples"]:
            raw = dict(raw)
            for key in ("target_size", "original_size", "crop_top_left"):
                raw[key] = tuple(raw[key])
            if raw.get("resized_size") is not None:
                raw["resized_size"] = tuple(raw["resized_size"])
            samples.append(Sample(**raw))
        return cls(root=root, samples=samples, trigger=payload.get("trigger", "TOK"), info=payload.get("info", {}))
