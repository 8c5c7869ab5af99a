"""Atomic file and folder writes: a cancelled or failed run never leaves a half-written output behind.

Everything is written to a temporary sibling first and then renamed into place; a rename within one file system is
atomic, so readers see either the old state or the complete new one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

TMP_MARK = ".partial-"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class WriteError(ValueError):
    """A file that could not be written (disk full, no permission); the message names the file."""


def write_error(error: OSError, path: Path | str) -> WriteError:
    """A :class:`WriteError` naming ``path`` for an ``OSError`` raised while writing it."""
    if error.errno in _DISK_FULL:
        return WriteError(f"the disk is full: could not write {path} (free space in {Path(path).parent})")
    return WriteError(f"could not write {path}: {error.strerror or type(error).__name__}")


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in _DISK_FULL


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary file path beside ``target``; on success it replaces ``target``, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_MARK}{target.name}.", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(target: Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it becomes ``target``.

    An existing ``target`` is replaced, or, with ``replace=False``, kept (another writer finished first).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_MARK}{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists() and not replace:
            return
        if target.exists():
            old = target.with_name(f"{TMP_MARK}old-{target.name}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sweep_partials(root: Path, *, older_than: float = 0.0, depth: int = 3) -> int:
    """Remove ``.partial-*`` leftovers of killed processes anywhere ``depth`` levels below ``root``; returns how many.

    ``older_than`` (seconds) spares partial files another live process may still be writing (a cache shared by
    several processes); a file being written has a fresh modification time.
    """
    root = Path(root)
    if not root.is_dir():
        return 0
    removed = 0
    now = time.time()
    folders = [(root, 0)]
    while folders:
        folder, level = folders.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith(TMP_MARK):
                try:
                    if now - entry.stat(follow_symlinks=False).st_mtime < older_than:
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        os.unlink(entry.path)
                    removed += 1
                except OSError:
                    continue
            elif level + 1 < depth and entry.is_dir(follow_symlinks=False):
                folders.append((Path(entry.path), level + 1))
    return removed


def remove_partials(folder: Path) -> None:
    """Remove leftovers of writes that a killed process could not clean up."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name.startswith(TMP_MARK):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
