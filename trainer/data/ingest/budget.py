"""Byte accounting shared by every download and archive member of one preparation."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from trainer.data.errors import DataError
from trainer.data.limits import DataLimits
from trainer.utils.download import human_size

CHUNK = 1 << 20


class ByteBudget:
    """The total bytes that downloads and unpacking may write (``max_total_bytes``)."""

    def __init__(self, limits: DataLimits) -> None:
        self.limit = limits.max_total_bytes
        self.used = 0
        self.max_files = limits.max_total_files
        self.files = 0

    @property
    def left(self) -> int:
        return self.limit - self.used

    def check(self, n: int, item: str) -> None:
        """Refuse ``n`` more bytes before writing them (declared sizes)."""
        if n > self.left:
            raise DataError(
                f"{item}: {human_size(n)} more would take the training data over its limit of "
                f"{human_size(self.limit)} in total; use fewer or smaller images"
            )

    def add(self, n: int, item: str) -> None:
        self.check(n, item)
        self.used += n

    def add_file(self, item: str) -> None:
        """Count one more file created (empty ones too: a file costs an inode and a log line whatever its size)."""
        self.files += 1
        if self.files > self.max_files:
            raise DataError(
                f"{item}: more than {self.max_files} files in total from all sources and archives; use fewer files "
                "(nested archives count too)"
            )


def copy_capped(src: BinaryIO, target: Path, *, budget: ByteBudget, item: str, max_bytes: int,
                what: str = "file") -> int:
    """Copy a stream to a new file, stopping with an error past ``max_bytes`` or the budget.

    The caller's declared size is never trusted: the limit is checked on the bytes that actually arrive.
    """
    written = 0
    with open(target, "xb") as handle:
        while True:
            chunk = src.read(CHUNK)
            if not chunk:
                break
            written += len(chunk)
            if written > max_bytes:
                raise DataError(f"{item}: the {what} is larger than the limit of {human_size(max_bytes)}")
            budget.add(len(chunk), item)
            handle.write(chunk)
    return written
