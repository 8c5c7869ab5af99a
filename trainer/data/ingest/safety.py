"""Turning names chosen by strangers (archive members, S3 keys, Content-Disposition) into safe local paths.

Nothing here trusts a name: a path is rebuilt from its cleaned components, never joined as given, so ``..``,
absolute paths, drive letters and control characters cannot steer a write outside the extraction folder.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from pathlib import Path, PurePosixPath

from trainer.data.errors import DataError

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_UNSAFE_CHARS = re.compile(r'[<>:"|?*\\]')
_DRIVE = re.compile(r"^[A-Za-z]:")
#: Bytes of one file-name component on common file systems.
MAX_COMPONENT_BYTES = 200
#: Longest relative path (characters) and deepest nesting accepted from an archive or a bucket.
MAX_PATH_CHARS = 1024
MAX_DEPTH = 32


class UnsafePath(DataError):
    """A member name that would escape its folder (absolute, ``..``, drive letter) or is empty."""


def member_parts(name: str) -> list[str]:
    """The components of an archive member name, or :class:`UnsafePath` when it points outside the archive.

    Both ``/`` and ``\\`` separate components (zips made on Windows use either). Empty and ``.`` components
    are dropped.
    """
    if "\x00" in name:
        raise UnsafePath("its name contains a NUL byte")
    unified = name.replace("\\", "/")
    if unified.startswith("/") or _DRIVE.match(unified):
        raise UnsafePath("absolute path")
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafePath("path goes up with '..'")
    if not parts:
        raise UnsafePath("empty name")
    if len(parts) > MAX_DEPTH or len(unified) > MAX_PATH_CHARS:
        raise UnsafePath("path too long or too deep")
    return parts


def printable(name: str) -> str:
    """``name`` safe to print: undecodable bytes (kept as surrogates by tarfile and os) and control characters
    become replacement characters."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return _CONTROL.sub("\ufffd", text)


def clean_component(part: str) -> str:
    """One path component made safe for any file system, still recognisable to the user."""
    part = unicodedata.normalize("NFC", printable(part))
    part = _CONTROL.sub("_", part)
    part = _UNSAFE_CHARS.sub("_", part).strip().rstrip(".")
    if part in ("", ".", ".."):
        part = "_"
    encoded = part.encode("utf-8")
    if len(encoded) > MAX_COMPONENT_BYTES:
        # Keep the extension (it helps the reader of logs) and make the shortened name unique with a hash.
        stem, dot, ext = part.rpartition(".")
        ext = f".{ext[:16]}" if dot and len(ext) <= 16 else ""
        digest = hashlib.sha1(encoded).hexdigest()[:12]
        stem = encoded[: MAX_COMPONENT_BYTES - 40].decode("utf-8", errors="ignore")
        part = f"{stem}-{digest}{ext}"
    return part


def safe_relative_path(name: str) -> PurePosixPath:
    """A relative path built from the cleaned components of ``name`` (raises :class:`UnsafePath`)."""
    return PurePosixPath(*(clean_component(p) for p in member_parts(name)))


def safe_filename(name: str, default: str = "download") -> str:
    """A single safe file name from an untrusted name (only its last component is kept)."""
    last = name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    cleaned = clean_component(last) if last else ""
    return default if cleaned in ("", "_") else cleaned


def resolve_inside(root: Path, relative: PurePosixPath) -> Path:
    """``root / relative``, checked to stay inside ``root`` once links are resolved (defence in depth)."""
    root_real = os.path.realpath(root)
    target = Path(root_real, *relative.parts)
    parent_real = os.path.realpath(target.parent)
    if os.path.commonpath([root_real, parent_real]) != root_real:
        raise UnsafePath("resolves outside the extraction folder")
    return target


def unique_path(path: Path) -> Path:
    """``path``, or ``name~2.ext``, ``name~3.ext``... when it is taken (duplicate member names)."""
    if not path.exists():
        return path
    stem, suffix = path.stem, path.suffix
    for n in range(2, 100_000):
        candidate = path.with_name(f"{stem}~{n}{suffix}")
        if not candidate.exists():
            return candidate
    raise DataError(f"too many files named {path.name}")


class NameTable:
    """The relative paths written into one new folder, so that duplicates get ``name~2.ext`` in constant time per
    name (a thousand members named alike cost a thousand steps, not half a million) and a file never lands on a
    folder, or inside a file, of the same name."""

    def __init__(self) -> None:
        self.files: set[str] = set()
        self.folders: set[str] = set()
        self.next_suffix: dict[str, int] = {}

    def claim(self, relative: PurePosixPath) -> PurePosixPath | None:
        parents = [p.as_posix() for p in reversed(relative.parents) if p.as_posix() != "."]
        if any(p in self.files for p in parents):
            return None
        name = relative.as_posix()
        if name in self.files or name in self.folders:
            stem, suffix = relative.stem, relative.suffix
            n = self.next_suffix.get(name, 2)
            candidate = relative.with_name(f"{stem}~{n}{suffix}")
            while candidate.as_posix() in self.files or candidate.as_posix() in self.folders:
                n += 1
                candidate = relative.with_name(f"{stem}~{n}{suffix}")
            self.next_suffix[name] = n + 1
            relative, name = candidate, candidate.as_posix()
        self.files.add(name)
        self.folders.update(parents)
        return relative
