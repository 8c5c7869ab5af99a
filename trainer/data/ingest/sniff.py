"""What a file is, from its first bytes rather than its name (names from the internet lie)."""

from __future__ import annotations

from pathlib import Path

ARCHIVE_KINDS = ("zip", "tar", "gzip", "bz2", "xz")
#: Recognised but refused, with a hint.
UNSUPPORTED_ARCHIVES = {"7z": "7z", "rar": "RAR", "zstd": "zstd"}


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
