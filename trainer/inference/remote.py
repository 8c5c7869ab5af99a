"""Trained LoRA zips by URL: each fetched once into a cache, unpacked there, and reused by later requests.

A predictor gets its LoRA as ``COG_WEIGHTS`` (set by the operator or by Replicate after a training) or per request
as ``lora_url``. http(s) URLs and ``s3://`` URIs are downloaded; local files and folders are read only where the
caller allows it (the request input is remote-facing, ``COG_WEIGHTS`` is not). The cache keeps the most recently
used ``max_entries`` LoRAs on disk, each in its own folder (the zip and its unpacked files), keyed by the full URL:
two signed URLs of one object are two entries, but a URL never serves another object's files.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from trainer.inference.bundle import LoraBundle
from trainer.utils.atomic import sweep_partials
from trainer.utils.download import download, redact_url
from trainer.utils.s3 import S3Uri, download_file, s3_client

logger = logging.getLogger(__name__)

#: The delivered zip holds a LoRA, embeddings and samples: far below this. A larger download is refused early.
MAX_DOWNLOAD_BYTES = 4 << 30
ZIP_NAME = "weights.zip"


def describe(location: str) -> str:
    """How messages name a LoRA location (URLs without credentials or signatures)."""
    return redact_url(location) if "://" in location else location


class BundleStore:
    def __init__(self, root: Path, *, max_entries: int = 8, s3_endpoint: str | None = None,
                 local_paths: bool = False) -> None:
        self.root = Path(root)
        self.local_paths = local_paths
        """Whether the bundles' training_args.json may name base models on this machine (the operator's switch)."""
        self.max_entries = max(1, max_entries)
        self.s3_endpoint = s3_endpoint
        self._open: dict[str, LoraBundle] = {}
        self._sweep()

    def get(self, location: str, *, allow_local: bool) -> LoraBundle:
        """The bundle at ``location`` (URL, ``s3://`` URI, or local zip/folder when allowed)."""
        location = location.strip()
        cached = self._open.get(location)
        if cached is not None and cached.folder.is_dir():
            self._touch(cached.folder.parent)
            return cached
        scheme = location.split("://", 1)[0].lower() if "://" in location else ""
        if scheme in ("http", "https", "s3"):
            bundle = self._fetch(location, scheme)
        elif scheme or location.lower().startswith("data:"):
            raise ValueError(f"LoRA location {describe(location)!r}: use an http(s):// URL or an s3:// URI of the zip "
                             "a training produced")
        else:
            if not allow_local:
                raise ValueError(f"LoRA location {location!r}: local paths are not accepted here; give the zip's "
                                 "http(s):// URL or s3:// URI")
            path = Path(location).expanduser()
            if not path.exists():
                raise ValueError(f"LoRA location {location!r}: no such file or folder")
            bundle = LoraBundle.open(path, self.root / "local" / _digest(str(path.resolve())),
                                     local_paths=self.local_paths)
        self._open[location] = bundle
        return bundle

    # ------------------------------------------------------------------------------------------ fetching
    def _fetch(self, url: str, scheme: str) -> LoraBundle:
        entry = self.root / "urls" / _digest(url)
        archive = entry / ZIP_NAME
        try:
            if archive.is_file():
                logger.info("using the cached LoRA %s", describe(url))
            else:
                self._prune(keep=entry)
                logger.info("downloading the LoRA %s", describe(url))
                if scheme == "s3":
                    download_file(s3_client(self.s3_endpoint), S3Uri.parse(url, what="LoRA location"), archive,
                                  max_bytes=MAX_DOWNLOAD_BYTES)
                else:
                    download(url, archive, max_bytes=MAX_DOWNLOAD_BYTES)
            self._touch(entry)
            return LoraBundle.open(archive, entry, local_paths=self.local_paths)
        except BaseException as error:
            # A refused, partial or useless download stays useless: nothing of it is kept for the next request.
            shutil.rmtree(entry, ignore_errors=True)
            if isinstance(error, ValueError):
                raise ValueError(f"LoRA location {describe(url)} ({_name_of(url)}): {error}") from None
            raise

    # --------------------------------------------------------------------------------------------- cache
    def _sweep(self) -> None:
        """At start-up: remove what a killed process left (partial downloads and unpacks, entries without a zip)."""
        removed = sweep_partials(self.root)
        urls = self.root / "urls"
        if urls.is_dir():
            for entry in urls.iterdir():
                if entry.is_dir() and not (entry / ZIP_NAME).is_file():
                    shutil.rmtree(entry, ignore_errors=True)
                    removed += 1
        if removed:
            logger.info("removed %d partial download(s) from the LoRA cache", removed)

    def _touch(self, entry: Path) -> None:
        now = time.time()
        with contextlib.suppress(OSError):
            os.utime(entry, (now, now))

    def _prune(self, keep: Path) -> None:
        """Keep the most recently used entries (leaving room for ``keep``)."""
        urls = self.root / "urls"
        if not urls.is_dir():
            return
        entries = sorted((e for e in urls.iterdir() if e.is_dir() and e != keep), key=lambda e: e.stat().st_mtime)
        excess = len(entries) - (self.max_entries - 1)
        for entry in entries[: max(0, excess)]:
            logger.info("removing the cached LoRA %s", entry.name)
            shutil.rmtree(entry, ignore_errors=True)
            self._open = {k: b for k, b in self._open.items() if b.folder.parent != entry}


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _name_of(url: str) -> str:
    return unquote(urlsplit(url).path.rsplit("/", 1)[-1]) or "download"
