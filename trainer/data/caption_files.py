"""Captions that come with the images.

Looked up in this order for each image:

1. a sidecar file beside it with the same stem: ``photo.txt`` (kohya, most trainers) or ``photo.caption``;
2. ``captions.csv`` / ``caption.csv`` in its folder or a folder above it, up to its source's top folder (the
   cog-sdxl form: columns ``caption`` and ``image_file``; ``file_name``/``filename``/``image`` and ``text``/``prompt``
   are accepted too);
3. ``metadata.jsonl`` likewise (the Hugging Face imagefolder form: ``{"file_name": ..., "text": ...}``, or
   ``caption``).

In tables, names are relative to the table's folder; a bare file name also matches an image deeper down when the
name is unique. Empty captions count as none (the caption model fills them in).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from trainer.data.captions import clean_caption_text
from trainer.data.ingest.collect import Candidate, CaptionTable
from trainer.data.limits import DataLimits
from trainer.data.report import PrepReport

logger = logging.getLogger(__name__)

SIDECAR_SUFFIXES = (".txt", ".caption")
SIDECAR_MAX_BYTES = 64 * 1024
FILE_COLUMNS = ("image_file", "file_name", "filename", "image", "file", "path")
TEXT_COLUMNS = ("caption", "text", "prompt")
_AMBIGUOUS = object()


@dataclass(frozen=True)
class FoundCaption:
    text: str
    origin: str
    """``sidecar``, ``captions.csv`` or ``metadata.jsonl`` (for the manifest's statistics)."""


@dataclass
class _Table:
    folder: Path
    origin: str
    by_path: dict[str, str] = field(default_factory=dict)
    by_name: dict[str, object] = field(default_factory=dict)


def _normalise_key(name: str) -> str:
    return PurePosixPath(name.replace("\\", "/").lstrip("./")).as_posix()


def read_text_capped(path: Path, max_bytes: int) -> str:
    with open(path, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"larger than {max_bytes} bytes")
    if b"\x00" in data:
        raise ValueError("it holds binary data, not text")
    text = data.decode("utf-8-sig", errors="replace")
    if text.count("\ufffd") > max(4, len(text) // 10):
        raise ValueError("it is not UTF-8 text (binary data?)")
    return text


#: Terminal escape sequences (colours, cursor moves) and the other control characters a caption never needs.
_ESCAPES = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def strip_controls(text: str) -> tuple[str, bool]:
    """``text`` without escape sequences and control characters (tabs and line breaks stay), and whether any were
    there: they would reach the tokenizer and the logs that print captions."""
    cleaned = _CONTROLS.sub(" ", _ESCAPES.sub("", text))
    return cleaned, cleaned != text


class CaptionIndex:
    """Captions from sidecars and tables, looked up per candidate image."""

    def __init__(self, tables: list[CaptionTable], limits: DataLimits, report: PrepReport) -> None:
        self._tables: dict[str, list[_Table]] = defaultdict(list)
        for table in tables:
            parsed = self._parse(table, limits, report)
            if parsed is not None:
                self._tables[os.path.normpath(table.path.parent)].append(parsed)

    # ----------------------------------------------------------------------------------------------- parsing
    def _parse(self, table: CaptionTable, limits: DataLimits, report: PrepReport) -> _Table | None:
        try:
            text = read_text_capped(table.path, limits.max_caption_file_bytes)
        except (OSError, ValueError) as error:
            report.warn(f"ignoring caption table {table.label}: {error}")
            return None
        origin = "metadata.jsonl" if table.path.name.lower().endswith(".jsonl") else "captions.csv"
        if origin == "metadata.jsonl":
            rows = self._jsonl_rows(text, table, report)
        else:
            rows = self._csv_rows(text, table, report)
        if rows is None:
            return None
        parsed = _Table(Path(os.path.normpath(table.path.parent)), origin)
        cleaned_rows = 0
        for name, caption in rows:
            key = _normalise_key(name)
            caption, had_controls = strip_controls(caption)
            cleaned_rows += had_controls
            caption = clean_caption_text(caption)
            if not key or not caption:
                continue
            parsed.by_path[key] = caption
            base = PurePosixPath(key).name
            parsed.by_name[base] = _AMBIGUOUS if base in parsed.by_name else caption
        if cleaned_rows:
            report.warn(f"{table.label}: removed control characters or terminal escapes from {cleaned_rows} caption(s)")
        logger.info("read %d captions from %s", len(parsed.by_path), table.label)
        return parsed

    @staticmethod
    def _csv_rows(text: str, table: CaptionTable, report: PrepReport) -> list[tuple[str, str]] | None:
        try:
            reader = csv.DictReader(io.StringIO(text))
            header = {(name or "").strip().lower(): name for name in (reader.fieldnames or [])}
            file_column = next((header[c] for c in FILE_COLUMNS if c in header), None)
            text_column = next((header[c] for c in TEXT_COLUMNS if c in header), None)
            if file_column is None or text_column is None:
                report.warn(
                    f"ignoring caption table {table.label}: it needs the columns caption and image_file, found "
                    f"{sorted(header)}"
                )
                return None
            return [(row.get(file_column) or "", row.get(text_column) or "") for row in reader]
        except csv.Error as error:
            report.warn(f"ignoring caption table {table.label}: not valid CSV ({error})")
            return None

    @staticmethod
    def _jsonl_rows(text: str, table: CaptionTable, report: PrepReport) -> list[tuple[str, str]]:
        rows, bad = [], []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # not JSON, or nested too deeply to read: this line only
                bad.append(number)
                continue
            if not isinstance(record, dict):
                bad.append(number)
                continue
            name = next((record[c] for c in FILE_COLUMNS if isinstance(record.get(c), str)), None)
            caption = next((record[c] for c in TEXT_COLUMNS if isinstance(record.get(c), str)), None)
            if name is None or caption is None:
                bad.append(number)
                continue
            rows.append((name, caption))
        if bad:
            shown = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
            report.warn(f"{table.label}: ignored {len(bad)} line(s) that are not JSON objects with file_name and text "
                        f"(line {shown})")
        return rows

    # ------------------------------------------------------------------------------------------------ lookup
    def lookup(self, candidate: Candidate, report: PrepReport) -> FoundCaption | None:
        sidecar = self._sidecar(candidate, report)
        if sidecar:
            return FoundCaption(sidecar, "sidecar")
        root = os.path.normpath(candidate.root)
        folder = Path(os.path.normpath(candidate.path.parent))
        while True:
            for table in self._tables.get(str(folder), ()):
                found = self._from_table(table, candidate.path)
                if found:
                    return FoundCaption(found, table.origin)
            if str(folder) == root or folder.parent == folder or not str(folder).startswith(root):
                return None
            folder = folder.parent

    @staticmethod
    def _sidecar(candidate: Candidate, report: PrepReport) -> str | None:
        for suffix in SIDECAR_SUFFIXES:
            path = candidate.path.with_suffix(suffix)
            if path == candidate.path or not path.is_file():
                continue
            try:
                raw = read_text_capped(path, SIDECAR_MAX_BYTES)
            except (OSError, ValueError) as error:
                report.warn(f"ignoring the caption file {path.name} of {candidate.label}: {error}")
                continue
            raw, had_controls = strip_controls(raw)
            if had_controls:
                report.warn(f"removed control characters or terminal escapes from the caption file {path.name} of "
                            f"{candidate.label}")
            text = clean_caption_text(raw)
            if text:
                return text
        return None

    @staticmethod
    def _from_table(table: _Table, image: Path) -> str | None:
        try:
            relative = Path(os.path.normpath(image)).relative_to(table.folder).as_posix()
        except ValueError:
            return None
        if relative in table.by_path:
            return table.by_path[relative]
        by_name = table.by_name.get(image.name)
        return by_name if isinstance(by_name, str) else None
