"""What a file is, from its first bytes rather than its name (names from the internet lie)."""

from __future__ import annotations

from pathlib import Path

ARCHIVE_KINDS = ("zip", "tar", "gzip", "bz2", "xz")
#: Recognised but refused, with a hint.
UNSUPPORTED_ARCHIVES = {"7z": "7z", "rar": "RAR", "zstd": "zstd"}

_NON_IMAGE_HINTS = (
    (b"%PDF", "a PDF document"),
    (b"\x00\x00\x00\x18ftypmp4", "an MP4 video"),
    (b"\x00\x00\x00\x20ftypisom", "an MP4 video"),
    (b"\x1a\x45\xdf\xa3", "a video (Matroska/WebM)"),
    (b"ID3", "an MP3 file"),
)


def read_head(path: Path, n: int = 512) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(n)


def sniff(head: bytes) -> str:
    """``zip``, ``tar``, ``gzip``, ``bz2``, ``xz``, ``7z``, ``rar``, ``zstd``, ``html`` or ``other``."""
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")):
        return "zip"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"BZh"):
        return "bz2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"7z\xbc\xaf\x27\x1c"):
        return "7z"
    if head.startswith(b"Rar!\x1a\x07"):
        return "rar"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "html"
    return "other"


def non_image_hint(head: bytes) -> str | None:
    """A short description of common non-image files, for skip messages."""
    kind = sniff(head)
    if kind == "html":
        return "an HTML page (is the link a direct download link?)"
    for magic, description in _NON_IMAGE_HINTS:
        if head.startswith(magic):
            return description
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head[:256]):
        return "a text file"
    return None
