"""The documented limits of data preparation.

They protect a shared machine (the cog API serves strangers) from downloads, archives and images that would fill its
disk or memory. Each limit is enforced before the expensive work where the input declares its size, and again while
the bytes flow, because declared sizes can lie.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.config.schema import TrainingConfig

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class DataLimits:
    max_images: int = 1000
    """Most distinct source images (after de-duplication, before augmentation): `max_train_images`."""
    max_download_bytes: int = 4 * GiB
    """Largest single download (an http(s) file or one S3 object)."""
    max_total_bytes: int = 16 * GiB
    """All downloads and unpacked archive members together."""
    max_archive_entries: int = 20_000
    """Most members in one archive (and most objects under one S3 prefix)."""
    max_total_files: int = 20_000
    """Most files all downloads and archives of one job may create together (nested archives included)."""
    max_compression_ratio: float = 200.0
    """Unpacked size / packed size above which a large member (or a whole compressed tar) is a bomb."""
    ratio_check_min_bytes: int = 32 * MiB
    """Members smaller than this are not ratio-checked: a small blank BMP legitimately packs 1000:1."""
    max_archive_depth: int = 2
    """Archives inside archives are unpacked this many levels deep (a source archive is level 1)."""
    max_image_pixels: int = 120_000_000
    """Largest image in pixels (decompression bombs); 120 MP admits any camera, 100 MP medium format included."""
    min_image_side: int = 64
    """Images whose shorter side is smaller than this are skipped: nothing useful survives the upscale."""
    max_caption_file_bytes: int = 16 * MiB
    """Largest caption table (captions.csv, metadata.jsonl); sidecar .txt files are read up to 64 KiB."""
    http_timeout: tuple[float, float] = (10.0, 60.0)
    """Connect and read timeouts (seconds) of http(s), S3 and OpenAI requests."""
    http_retries: int = 3
    """Retries of a failed request (connection errors, timeouts, HTTP 429 and 5xx)."""
    http_backoff: float = 1.0
    """First retry delay in seconds; it doubles on each retry."""

    @classmethod
    def from_config(cls, config: TrainingConfig) -> DataLimits:
        return cls(max_images=config.max_train_images)
