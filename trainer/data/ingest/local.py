"""Local files and folders: allowed from the command line, refused through the API unless enabled."""

from __future__ import annotations

import re
from pathlib import Path

from trainer.data.errors import SourceError
from trainer.data.ingest.sources import SourceRef

_LOOKS_LIKE_HOST = re.compile(r"^(www\.)?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+/")


def resolve_local(ref: SourceRef, allow_local: bool) -> Path:
    if not allow_local:
        raise SourceError(
            f"training source {ref.label!r}: local paths are not accepted here; give http(s):// or s3:// URLs"
        )
    path = Path(ref.value).expanduser()
    if not path.exists():
        hint = ""
        if _LOOKS_LIKE_HOST.match(ref.value):
            hint = f" (did you mean https://{ref.value}?)"
        raise SourceError(f"training source {ref.label!r}: no such file or folder{hint}")
    if not (path.is_file() or path.is_dir()):
        raise SourceError(f"training source {ref.label!r}: neither a regular file nor a folder")
    return path
