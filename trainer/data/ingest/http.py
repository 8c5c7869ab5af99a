"""http(s) sources: one file each (an image, an archive or a caption table)."""

from __future__ import annotations

from pathlib import Path

from trainer.data.errors import SourceError
from trainer.data.ingest.budget import ByteBudget
from trainer.data.ingest.safety import safe_filename, unique_path
from trainer.data.ingest.sources import SourceRef
from trainer.data.limits import DataLimits
from trainer.utils.download import DownloadError, fetch


def fetch_http(ref: SourceRef, folder: Path, limits: DataLimits, budget: ByteBudget) -> Path:
    """Download ``ref`` into ``folder`` under the name the server or the URL suggests (sanitised)."""
    folder.mkdir(parents=True, exist_ok=True)

    def choose_target(suggested: str | None) -> Path:
        return unique_path(folder / safe_filename(suggested or "", default="download"))

    try:
        result = fetch(
            ref.value, choose_target, max_bytes=min(limits.max_download_bytes, max(budget.left, 0)),
            retries=limits.http_retries, backoff=limits.http_backoff, timeout=limits.http_timeout, progress=True,
        )
    except DownloadError as error:
        raise SourceError(f"training source {error}") from None
    budget.add_file(ref.label)
    budget.add(result.path.stat().st_size, ref.label)
    return result.path
