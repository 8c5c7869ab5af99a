"""From the list of sources to candidate image files on local disk, with their caption tables.

Sources are fetched in the order given; folders are walked in sorted order, so the same input always gives the same
dataset. Archives are unpacked (nested ones too, up to a depth limit) into the scratch folder. Exact duplicates are
dropped by content hash. Whether a candidate really is an image is decided later, when it is decoded.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from trainer.data.errors import SourceError
from trainer.data.ingest.archives import ExtractContext, extract_archive, has_archive_suffix, member_label
from trainer.data.ingest.budget import ByteBudget
from trainer.data.ingest.http import fetch_http
from trainer.data.ingest.local import resolve_local
from trainer.data.ingest.s3 import S3Fetcher
from trainer.data.ingest.safety import printable
from trainer.data.ingest.sniff import ARCHIVE_KINDS, UNSUPPORTED_ARCHIVES, read_head, sniff
from trainer.data.ingest.sources import SourceRef, parse_source
from trainer.data.limits import DataLimits
from trainer.data.report import PrepReport

logger = logging.getLogger(__name__)

CAPTION_TABLE_NAMES = ("captions.csv", "caption.csv", "metadata.jsonl")
SIDECAR_SUFFIXES = (".txt", ".caption")
#: Metadata that travels with image sets (other captioning tools' files, camera sidecars, READMEs): left out
#: without a warning. Any other file that is not an image is skipped with a warning naming it.
QUIET_SUFFIXES = (".json", ".jsonl", ".csv", ".md", ".yaml", ".yml", ".toml", ".xmp")
JUNK_NAMES = {"thumbs.db", "desktop.ini", "__macosx", "__pycache__", "icon\r"}


@dataclass(frozen=True)
class Candidate:
    path: Path
    label: str
    """How messages and ``Sample.source`` name it: a local path, a redacted URL, or ``member (in archive)``."""
    root: Path
    """The folder that caption tables and sidecars of this image are looked up in (its source's top folder)."""


@dataclass(frozen=True)
class CaptionTable:
    path: Path
    label: str


@dataclass
class Ingested:
    candidates: list[Candidate] = field(default_factory=list)
    tables: list[CaptionTable] = field(default_factory=list)
    duplicates: int = 0


def _is_junk(name: str) -> bool:
    # Hidden files, macOS resource forks (._x.jpg) and OS thumbnail caches are never training images.
    return name.startswith(".") or name.lower() in JUNK_NAMES


class _Collector:
    def __init__(self, scratch: Path, limits: DataLimits, report: PrepReport) -> None:
        self.scratch = scratch
        self.limits = limits
        self.report = report
        self.budget = ByteBudget(limits)
        self.ctx = ExtractContext(limits, self.budget, report)
        self.result = Ingested()
        self._unpacked = 0

    # A top-level file is sniffed whatever its name (URLs often have none); inside folders, only files named like
    # archives are unpacked, so that an Office document (a zip too) is not opened as one.
    def add_file(self, path: Path, label: str, root: Path, depth: int, top: bool) -> None:
        name = path.name.lower()
        if name in CAPTION_TABLE_NAMES:
            self.result.tables.append(CaptionTable(path, label))
            return
        if name.endswith(SIDECAR_SUFFIXES):
            return
        if not top and name.endswith(QUIET_SUFFIXES):
            logger.debug("ignoring %s", label)
            return
        try:
            head = read_head(path)
        except OSError as error:
            if top:
                raise SourceError(f"training source {label!r}: cannot be read ({error.strerror})") from None
            self.report.skip(label, f"cannot be read ({error.strerror})")
            return
        kind = sniff(head)
        if kind in ARCHIVE_KINDS and (top or has_archive_suffix(name)):
            self._unpack(path, kind, label, depth)
        elif kind in UNSUPPORTED_ARCHIVES:
            message = f"{UNSUPPORTED_ARCHIVES[kind]} archives are not supported; repack the images as zip or tar"
            if top:
                raise SourceError(f"training source {label}: {message}")
            self.report.skip(label, message)
        elif kind == "html" and top:
            raise SourceError(
                f"training source {label}: the server sent an HTML page, not an image or an archive; is the link "
                "a direct download link (for example Dropbox ?dl=1, or a raw file URL)?"
            )
        else:
            self.result.candidates.append(Candidate(path, label, root))

    def add_folder(self, folder: Path, label: str, depth: int, local: bool) -> None:
        # A local folder may hold the run folder itself ("." as the source): never read our own output back.
        own = os.path.realpath(self.scratch.parent)
        for directory, subdirs, files in os.walk(folder, followlinks=False):
            subdirs[:] = sorted(
                d for d in subdirs if not _is_junk(d) and os.path.realpath(os.path.join(directory, d)) != own
            )
            for name in sorted(files):
                if _is_junk(name):
                    continue
                path = Path(directory, name)
                file_label = printable(str(path)) if local else member_label(path.relative_to(folder).as_posix(), label)
                self.add_file(path, file_label, folder, depth, top=False)

    def _unpack(self, path: Path, kind: str, label: str, depth: int) -> None:
        if depth >= self.limits.max_archive_depth:
            self.report.skip(label, f"archive nested more than {self.limits.max_archive_depth} deep")
            return
        self._unpacked += 1
        dest = self.scratch / "unpacked" / f"{self._unpacked:04d}"
        logger.info("unpacking %s", label)
        extract_archive(path, kind, dest, label, self.ctx)
        self.add_folder(dest, label, depth + 1, local=False)


def check_sources(refs: list[SourceRef], allow_local: bool) -> None:
    """Fail on refused local paths before anything is downloaded (malformed S3 URIs fail in ``parse_source``)."""
    for ref in refs:
        if ref.kind == "local":
            resolve_local(ref, allow_local)


def ingest_sources(sources: list[str], scratch: Path, *, limits: DataLimits, report: PrepReport,
                   allow_local: bool, s3_endpoint: str | None = None) -> Ingested:
    """Fetch, unpack and list every candidate image of ``sources`` (scratch files go under ``scratch``)."""
    refs = [parse_source(source) for source in sources]
    check_sources(refs, allow_local)
    collector = _Collector(scratch, limits, report)
    files_folder = scratch / "files"
    s3: S3Fetcher | None = None
    for index, ref in enumerate(refs):
        if ref.kind == "local":
            path = resolve_local(ref, allow_local)
            if path.is_dir():
                collector.add_folder(path, ref.label, depth=0, local=True)
            else:
                collector.add_file(path, ref.label, path.parent, depth=0, top=True)
        elif ref.kind == "http":
            logger.info("downloading %s", ref.label)
            path = fetch_http(ref, files_folder, limits, collector.budget)
            collector.add_file(path, ref.label, files_folder, depth=0, top=True)
        else:
            s3 = s3 or S3Fetcher(limits, collector.budget, report, s3_endpoint)
            logger.info("downloading %s", ref.label)
            path = s3.fetch(ref, files_folder, scratch / f"s3-{index:03d}")
            if path.is_dir():
                collector.add_folder(path, ref.label, depth=0, local=False)
            else:
                collector.add_file(path, ref.label, files_folder, depth=0, top=True)
    result = collector.result
    result.candidates, result.duplicates = dedupe(result.candidates)
    return result


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dedupe(candidates: list[Candidate]) -> tuple[list[Candidate], int]:
    """Keep the first of each set of byte-identical files."""
    seen: dict[str, str] = {}
    kept: list[Candidate] = []
    for candidate in candidates:
        try:
            digest = file_digest(candidate.path)
        except OSError:
            kept.append(candidate)  # unreadable: decoding reports it by name
            continue
        if digest in seen:
            logger.info("skipping %s: same content as %s", candidate.label, seen[digest])
            continue
        seen[digest] = candidate.label
        kept.append(candidate)
    return kept, len(candidates) - len(kept)
