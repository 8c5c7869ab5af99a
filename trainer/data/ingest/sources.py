"""Reading ``lora_training_urls``: splitting it into sources and telling their kinds apart."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

from trainer.data.errors import SourceError
from trainer.utils.download import redact_url
from trainer.utils.s3 import S3Uri

SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
SUPPORTED = "http://, https://, s3:// or a local path"
# Among URLs, a comma separates sources when a space follows it (URLs cannot hold spaces) or when what follows
# begins a source (a scheme, an absolute or home path): URLs such as Cloudinary's keep their own commas
# (".../w_200,h_100/photo.jpg").
_SOURCE_COMMA = re.compile(r",(?:\s+|(?=[A-Za-z][A-Za-z0-9+.\-]*://|/|~))")


@dataclass(frozen=True)
class SourceRef:
    kind: Literal["http", "s3", "local"]
    value: str
    """The URL or the local path (``file://`` URLs are turned into paths)."""
    label: str
    """How messages name it: URLs without credentials or query strings."""


def split_sources(value: str | list[str]) -> list[str]:
    """Split ``lora_training_urls`` into sources: a list, a JSON list, or text separated by |, commas or newlines."""
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        text = value.strip()
        if text.startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as error:
                raise SourceError(
                    f"lora_training_urls looks like a JSON list but does not parse ({error.msg} at character "
                    f"{error.pos}); write it as [\"https://...\", \"s3://...\"]"
                ) from None
            if not isinstance(items, list):
                raise SourceError("lora_training_urls as JSON must be a list of strings")
        else:
            items = []
            for piece in re.split(r"[|\r\n]+", text):
                items.extend(_split_commas(piece))
    sources = []
    for item in items:
        if not isinstance(item, str):
            raise SourceError(f"lora_training_urls must hold strings, got {type(item).__name__} {item!r}")
        item = item.strip().strip("'\"").strip()
        if item:
            sources.append(item)
    if not sources:
        raise SourceError("lora_training_urls is empty: give at least one URL, S3 object or local path")
    return sources


def _split_commas(piece: str) -> list[str]:
    if "://" not in piece:
        return piece.split(",")
    return _SOURCE_COMMA.split(piece)


def parse_source(text: str) -> SourceRef:
    """Classify one source; unsupported schemes are refused here, before anything is fetched."""
    match = SCHEME.match(text)
    if match is None:
        if text.lower().startswith("data:"):
            raise SourceError("training source 'data:...': data URLs are not supported; give " + SUPPORTED)
        return SourceRef("local", text, text)
    scheme = match.group(1).lower()
    if scheme in ("http", "https"):
        if not urlsplit(text).hostname:
            raise SourceError(f"training source {redact_url(text)!r}: the URL has no host name")
        return SourceRef("http", text, redact_url(text))
    if scheme == "s3":
        parse_s3_source(text)
        return SourceRef("s3", text, redact_url(text))
    if scheme == "file":
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise SourceError(f"training source {redact_url(text)!r}: file URLs must point to this machine")
        return SourceRef("local", unquote(parts.path), text)
    raise SourceError(
        f"training source {redact_url(text)!r}: unsupported scheme '{scheme}://'; give {SUPPORTED}"
    )


def parse_s3_source(text: str) -> S3Uri:
    """An ``s3://`` source by the one S3 URI rule (:class:`~trainer.utils.s3.S3Uri`), or a :class:`SourceError`."""
    try:
        return S3Uri.parse(text, what=f"training source {redact_url(text)!r}")
    except ValueError as error:
        raise SourceError(str(error)) from None
