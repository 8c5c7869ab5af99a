"""HTTP(S) downloads: streamed, with timeouts, retries with backoff, a size cap, and atomic placement.

Messages never contain credentials or signed-URL query strings (see :func:`redact_url`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from trainer.utils.atomic import atomic_path

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = (10.0, 60.0)  # connect, read (seconds between bytes)
CHUNK = 1 << 20
#: Longest wait honoured from a server's Retry-After header.
MAX_RETRY_AFTER = 60.0


class DownloadError(ValueError):
    """A download that failed for a reason the user can act on (the message names the redacted URL)."""


class _Transient(Exception):
    """A failure worth retrying: connection trouble, a timeout, HTTP 429 or 5xx."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Downloaded:
    path: Path
    content_type: str
    """The server's Content-Type without parameters (lower case), or an empty string."""
    suggested_name: str | None
    """File name from Content-Disposition, else the URL's last path segment (untrusted: sanitise before use)."""


def redact_url(url: str) -> str:
    """The URL without user info and query string: safe to log and to show in errors."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
    except ValueError:
        return "<unparseable url>"
    query = "?…" if parts.query else ""
    return urlunsplit((parts.scheme, host, parts.path, "", "")) + query


def human_size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def download(url: str, target: Path, *, max_bytes: int | None = None, retries: int = 3, backoff: float = 1.0,
             timeout: tuple[float, float] = DEFAULT_TIMEOUT, progress: bool = False) -> Path:
    """Download ``url`` to ``target`` atomically. Retries connection errors and 5xx/429 answers with backoff."""
    return fetch(url, lambda _name: Path(target), max_bytes=max_bytes, retries=retries, backoff=backoff,
                 timeout=timeout, progress=progress).path


def fetch(url: str, choose_target: Callable[[str | None], Path], *, max_bytes: int | None = None,
          retries: int = 3, backoff: float = 1.0, timeout: tuple[float, float] = DEFAULT_TIMEOUT,
          progress: bool = False) -> Downloaded:
    """Download ``url`` to the path that ``choose_target(suggested_name)`` returns, once the answer is known.

    The file appears atomically and only when complete. Retries connection errors, timeouts and HTTP 429/5xx with
    exponential backoff (or the server's Retry-After, up to a minute).
    """
    shown = redact_url(url)
    last_error: _Transient | None = None
    for attempt in range(retries + 1):
        if attempt:
            assert last_error is not None
            delay = backoff * (2 ** (attempt - 1))
            if last_error.retry_after is not None:
                delay = max(delay, min(last_error.retry_after, MAX_RETRY_AFTER))
            logger.warning("retrying %s in %.1fs (%s)", shown, delay, last_error)
            time.sleep(delay)
        try:
            return _attempt(url, shown, choose_target, max_bytes, timeout, progress)
        except _Transient as error:
            last_error = error
    assert last_error is not None
    raise DownloadError(f"{last_error} (gave up after {retries + 1} attempts)")


def _attempt(url: str, shown: str, choose_target: Callable[[str | None], Path], max_bytes: int | None,
             timeout: tuple[float, float], progress: bool) -> Downloaded:
    import requests

    try:
        with requests.get(url, stream=True, timeout=timeout, allow_redirects=True) as response:
            status = response.status_code
            if status == 429 or status >= 500:
                raise _Transient(f"{shown}: server answered HTTP {status}", _retry_after(response))
            if status >= 400:
                raise DownloadError(f"{shown}: server answered HTTP {status}{_status_hint(status)}")
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if max_bytes is not None and total is not None and total > max_bytes:
                raise DownloadError(
                    f"{shown}: {human_size(total)} is over the limit of {human_size(max_bytes)}"
                )
            suggested = _suggested_name(response.headers.get("Content-Disposition"), response.url or url)
            content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
            target = choose_target(suggested)
            _stream_to(response, target, shown, max_bytes, progress, total)
            return Downloaded(target, content_type, suggested)
    except requests.exceptions.Timeout:
        raise _Transient(f"{shown}: timed out after {timeout[0]:.0f}s to connect / {timeout[1]:.0f}s to read") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError) as error:
        # A read timeout in the middle of the body arrives as a ConnectionError wrapping urllib3's ReadTimeoutError.
        if "timed out" in str(error).lower():
            raise _Transient(f"{shown}: timed out while reading the answer") from None
        raise _Transient(f"{shown}: could not connect or the connection broke ({type(error).__name__})") from None
    except requests.exceptions.RequestException as error:
        raise DownloadError(f"{shown}: {type(error).__name__}") from None


def _status_hint(status: int) -> str:
    if status == 404:
        return " (not found: check the URL)"
    if status in (401, 403):
        return " (access denied: is the link public or still valid?)"
    if status == 410:
        return " (gone: the link has expired)"
    return ""


def _retry_after(response) -> float | None:
    value = response.headers.get("Retry-After", "")
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _suggested_name(disposition: str | None, url: str) -> str | None:
    if disposition:
        message = Message()
        message["content-disposition"] = disposition
        name = message.get_filename()
        if name:
            return name
    path = urlsplit(url).path
    last = unquote(path.rsplit("/", 1)[-1]) if path else ""
    return last or None


def _stream_to(response, target: Path, shown: str, max_bytes: int | None, progress: bool,
               total: int | None) -> Path:
    from tqdm.auto import tqdm

    received = 0
    with atomic_path(target) as tmp, open(tmp, "wb") as handle, tqdm(
        total=total, unit="B", unit_scale=True, desc=target.name, disable=not progress, leave=False
    ) as bar:
        for chunk in response.iter_content(CHUNK):
            received += len(chunk)
            if max_bytes is not None and received > max_bytes:
                raise DownloadError(f"{shown}: more than the limit of {human_size(max_bytes)}")
            handle.write(chunk)
            bar.update(len(chunk))
        if total is not None and received < total and not response.headers.get("Content-Encoding"):
            raise _Transient(f"{shown}: connection closed after {received} of {total} bytes")
    return target
