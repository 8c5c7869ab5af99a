"""The one outbound HTTP(S) client: every URL a request names (training sources, ``ckpt_path``, LoRA zips, evaluation
weights) is fetched here.

A URL comes from a stranger, so each fetch

- resolves the host name and refuses loopback, private, link-local, multicast, reserved and unspecified addresses
  (however the URL spells them: ``127.1``, ``0x7f.1``, ``2130706433``, ``localhost``, ``[::ffff:127.0.0.1]``), at
  every redirect hop, unless the operator allows them (``TRAINER_ALLOW_PRIVATE_HOSTS``);
- connects to the very address that was checked (a second DNS answer cannot swap in another one), with TLS still
  verified against the host name;
- stops past a byte cap (checked on the declared length and on the bytes that arrive), and past an overall deadline
  (``TRAINER_DOWNLOAD_DEADLINE``) however slowly the server trickles bytes;
- ends within a fraction of a second when the job is cancelled (:func:`stop_downloads_on`), even inside a blocked read;
- places the file atomically: it appears only when complete, and a failed fetch leaves nothing.

Messages never contain credentials or signed-URL query strings (see :func:`redact_url`). Proxy variables
(``HTTPS_PROXY``) are not used: a proxy would connect to addresses this module never sees.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import http.client
import ipaddress
import logging
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

from urllib3.exceptions import InvalidHeader, MaxRetryError

from trainer.utils.atomic import atomic_path, write_error
from trainer.utils.retry import RETRY_STATUSES, http_retry

logger = logging.getLogger(__name__)

#: Hosts, addresses or networks (``127.0.0.1``, ``10.0.0.0/8``, ``[::1]:9000``, ``minio.internal:9000``), separated by
#: commas or spaces, that fetches may reach although they are not public. Empty: public addresses only.
ENV_ALLOW_PRIVATE_HOSTS = "TRAINER_ALLOW_PRIVATE_HOSTS"
#: Seconds one fetch may take in all, retries included (default 3600).
ENV_DOWNLOAD_DEADLINE = "TRAINER_DOWNLOAD_DEADLINE"

DEFAULT_TIMEOUT = (10.0, 60.0)  # connect, read (seconds between bytes)
DEFAULT_DEADLINE = 3600.0
#: Largest download unless the caller sets its own cap.
DEFAULT_MAX_BYTES = 4 << 30
CHUNK = 1 << 20
MAX_REDIRECTS = 5
#: How often the watchdog looks at the deadline and the stop signal.
WATCH_SECONDS = 0.1
_REDIRECTS = (301, 302, 303, 307, 308)
_USER_AGENT = "sd-lora-trainer"

_stop_signal: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("download_stop", default=None)


class DownloadError(ValueError):
    """A download that failed for a reason the user can act on (the message names the redacted URL)."""


class TooLarge(DownloadError):
    """A body over the byte cap of this download (declared or received)."""


class RefusedDestination(DownloadError):
    """A URL whose host is not a public internet address (and not one the operator allows)."""


class DownloadCancelled(Exception):
    """The job was cancelled while it downloaded; nothing of the download is left."""


class _Transient(Exception):
    """A failure worth retrying: connection trouble, a timeout, HTTP 429 or 5xx."""

    def __init__(self, message: str, retry_after: str | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Downloaded:
    path: Path
    content_type: str
    """The server's Content-Type without parameters (lower case), or an empty string."""
    suggested_name: str | None
    """File name from Content-Disposition, else the URL's last path segment (untrusted: sanitise before use)."""


# ============================================================================================= messages
def redact_url(url: str) -> str:
    """The URL without user info and query string: safe to log and to show in errors."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if parts.port:
            host = f"{host}:{parts.port}"
    except ValueError:
        return "<unparseable url>"
    query = "?…" if parts.query else ""
    return urlunsplit((parts.scheme, host, parts.path, "", "")) + query


#: A URL inside free text: up to the first space, quote, bracket or list separator.
_URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>|,\]\)]+")


def redact_text(text: str) -> str:
    """``text`` with every URL that carries credentials or a query string redacted (see :func:`redact_url`)."""

    def replace(match: re.Match[str]) -> str:
        url = match.group(0)
        try:
            parts = urlsplit(url)
            secret = parts.username is not None or parts.password is not None or bool(parts.query)
        except ValueError:
            return "<unparseable url>"
        return redact_url(url) if secret else url

    return _URL_IN_TEXT.sub(replace, text)


def redact_values(value):
    """A copy of JSON-like ``value`` whose strings are passed through :func:`redact_text` (for files users share)."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {key: redact_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_values(item) for item in value]
    return value


def human_size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# ============================================================================================= cancellation
@contextlib.contextmanager
def stop_downloads_on(event: threading.Event) -> Iterator[None]:
    """Fetches made inside this block (in this thread or a copy of its context) end when ``event`` is set."""
    token = _stop_signal.set(event)
    try:
        yield
    finally:
        _stop_signal.reset(token)


def _stopped() -> bool:
    event = _stop_signal.get()
    return event is not None and event.is_set()


# ============================================================================================= destinations
@dataclass(frozen=True)
class _Allowed:
    networks: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None], ...] = ()
    hosts: tuple[tuple[str, int | None], ...] = ()

    def admits(self, host: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bool:
        for name, allowed_port in self.hosts:
            if name == host and allowed_port in (None, port):
                return True
        return any(address in network and allowed_port in (None, port) for network, allowed_port in self.networks)


def allowed_destinations(value: str | None = None) -> _Allowed:
    """The operator's ``TRAINER_ALLOW_PRIVATE_HOSTS``, parsed (a bad entry is an error naming it)."""
    text = os.environ.get(ENV_ALLOW_PRIVATE_HOSTS, "") if value is None else value
    networks, hosts = [], []
    for entry in text.replace(",", " ").split():
        target, port = _split_port(entry)
        try:
            networks.append((ipaddress.ip_network(target, strict=False), port))
        except ValueError:
            if not target or "/" in target:
                raise ValueError(f"{ENV_ALLOW_PRIVATE_HOSTS}: {entry!r} is not a host, an address or a network "
                                 "(for example 127.0.0.1, 10.0.0.0/8, [::1]:9000, minio.internal:9000)") from None
            hosts.append((target.lower().rstrip("."), port))
    return _Allowed(tuple(networks), tuple(hosts))


def _split_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif entry.count(":") == 1:
        host, _, port = entry.partition(":")
    else:
        host, port = entry, ""
    if port and not port.isdigit():
        raise ValueError(f"{ENV_ALLOW_PRIVATE_HOSTS}: {entry!r} has a port that is not a number")
    return host, int(port) if port else None


def _unwrap(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, Teredo, NAT64), which is where it really leads."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
        if address.teredo is not None:
            return address.teredo[1]
        if address in ipaddress.ip_network("64:ff9b::/96"):
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def address_kind(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``address`` is not a public internet address (``loopback``, ``private``...), or None when it is."""
    inner = _unwrap(address)
    for candidate in (inner, address):
        for kind in ("loopback", "unspecified", "link_local", "multicast", "reserved", "private"):
            if getattr(candidate, f"is_{kind}"):
                return kind.replace("_", "-")
        if not candidate.is_global:
            return "non-public"
    return None


def resolve_checked(host: str, port: int, shown: str, allowed: _Allowed | None = None) -> list[str]:
    """The addresses of ``host``, all of them public or allowed by the operator; else :class:`RefusedDestination`."""
    allowed = allowed if allowed is not None else allowed_destinations()
    name = host.lower().rstrip(".")
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        raise _Transient(f"{shown}: the host name does not resolve ({getattr(error, 'strerror', None) or error})"
                         ) from None
    addresses = []
    for info in infos:
        text = str(info[4][0]).split("%", 1)[0]
        if text not in addresses:
            addresses.append(text)
    for text in addresses:
        address = ipaddress.ip_address(text)
        kind = address_kind(address)
        if kind is not None and not allowed.admits(name, address, port):
            raise RefusedDestination(
                f"{shown}: {host} is a {kind} address ({text}); this server fetches only from public internet "
                f"addresses (the operator can allow a host with {ENV_ALLOW_PRIVATE_HOSTS})"
            )
    if not addresses:
        raise _Transient(f"{shown}: the host name does not resolve")
    return addresses


# ============================================================================================= connections
class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to an address resolved and checked beforehand, not to whatever the host name resolves to now."""

    def __init__(self, host: str, port: int, address: str, timeout: tuple[float, float]) -> None:
        super().__init__(host, port, timeout=timeout[0])
        self._address = address
        self._read_timeout = timeout[1]

    def _open_socket(self) -> socket.socket:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        sock.settimeout(self._read_timeout)
        return sock

    def connect(self) -> None:
        self.sock = self._open_socket()


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    default_port = http.client.HTTPS_PORT

    def __init__(self, host: str, port: int, address: str, timeout: tuple[float, float]) -> None:
        super().__init__(host, port, address, timeout)
        self._context = _tls_context()

    def connect(self) -> None:
        # The certificate is verified against the host name of the URL, as for any HTTPS request.
        self.sock = self._context.wrap_socket(self._open_socket(), server_hostname=self.host)


def _tls_context() -> ssl.SSLContext:
    try:
        import certifi

        return ssl.create_default_context(cafile=certifi.where())
    except ImportError:  # pragma: no cover - certifi comes with requests, which is always installed
        return ssl.create_default_context()


class _Watchdog:
    """Shuts the connection's socket down when the deadline passes or the job is cancelled: a blocked ``recv``
    returns at once instead of after the read timeout."""

    def __init__(self, ends_at: float) -> None:
        self.ends_at = ends_at
        self.fired: str | None = None
        self._sock: socket.socket | None = None
        self._done = threading.Event()
        self._stop = _stop_signal.get()
        self._thread = threading.Thread(target=self._run, name="download-watchdog", daemon=True)
        self._thread.start()

    def watch(self, sock: socket.socket | None) -> None:
        self._sock = sock
        if self.fired:
            self._kill()

    def _run(self) -> None:
        while not self._done.wait(WATCH_SECONDS):
            if self._stop is not None and self._stop.is_set():
                self.fired = "cancelled"
            elif time.monotonic() > self.ends_at:
                self.fired = "deadline"
            if self.fired:
                self._kill()
                return

    def _kill(self) -> None:
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._done.set()


def download_deadline() -> float:
    value = os.environ.get(ENV_DOWNLOAD_DEADLINE, "").strip()
    try:
        return float(value) if value else DEFAULT_DEADLINE
    except ValueError:
        raise ValueError(f"{ENV_DOWNLOAD_DEADLINE} must be a number of seconds, got {value!r}") from None


# ============================================================================================= fetching
def download(url: str, target: Path, *, max_bytes: int = DEFAULT_MAX_BYTES, retries: int = 3, backoff: float = 1.0,
             timeout: tuple[float, float] = DEFAULT_TIMEOUT, progress: bool = False,
             deadline: float | None = None) -> Path:
    """Download ``url`` to ``target`` atomically. Retries connection errors and 5xx/429 answers with backoff."""
    return fetch(url, lambda _name: Path(target), max_bytes=max_bytes, retries=retries, backoff=backoff,
                 timeout=timeout, progress=progress, deadline=deadline).path


def fetch(url: str, choose_target: Callable[[str | None], Path], *, max_bytes: int = DEFAULT_MAX_BYTES,
          retries: int = 3, backoff: float = 1.0, timeout: tuple[float, float] = DEFAULT_TIMEOUT,
          progress: bool = False, deadline: float | None = None) -> Downloaded:
    """Download ``url`` to the path that ``choose_target(suggested_name)`` returns, once the answer is known.

    The file appears atomically and only when complete. Retries connection errors, timeouts and HTTP 429/5xx by
    the one retry policy (:mod:`trainer.utils.retry`), all within ``deadline`` seconds (default:
    ``TRAINER_DOWNLOAD_DEADLINE``, one hour).
    """
    shown = redact_url(url)
    limit = deadline if deadline is not None else download_deadline()
    ends_at = time.monotonic() + limit
    allowed = allowed_destinations()
    policy = http_retry(retries, backoff)
    attempts = 0
    while True:
        if _stopped():
            raise DownloadCancelled(f"{shown}: the download was cancelled")
        attempts += 1
        try:
            return _attempt(url, shown, choose_target, max_bytes, timeout, progress, ends_at, limit, allowed)
        except _Transient as error:
            last_error = error
        try:
            policy = policy.increment(method="GET", url=shown, error=last_error)
        except MaxRetryError:
            break
        delay = policy.get_backoff_time()
        if last_error.retry_after is not None:
            with contextlib.suppress(InvalidHeader):  # an unreadable Retry-After leaves the backoff
                delay = max(delay, policy.parse_retry_after(last_error.retry_after))
        if time.monotonic() + delay > ends_at:
            break
        logger.warning("retrying %s in %.1fs (%s)", shown, delay, last_error)
        _sleep(delay)
    raise DownloadError(f"{last_error} (gave up after {attempts} attempts)")


def _sleep(seconds: float) -> None:
    """A wait that a cancellation cuts short."""
    ends = time.monotonic() + seconds
    while time.monotonic() < ends and not _stopped():
        time.sleep(min(WATCH_SECONDS, max(0.0, ends - time.monotonic())))


def _attempt(url: str, shown: str, choose_target: Callable[[str | None], Path], max_bytes: int,
             timeout: tuple[float, float], progress: bool, ends_at: float, limit: float,
             allowed: _Allowed) -> Downloaded:
    watchdog = _Watchdog(ends_at)
    try:
        response, connection, final_url = _open(url, shown, timeout, watchdog, allowed)
        with contextlib.closing(connection), contextlib.closing(response):
            status = response.status
            if status in RETRY_STATUSES:
                raise _Transient(f"{shown}: server answered HTTP {status}", _retry_after(response))
            if status >= 400 or status in _REDIRECTS:
                raise DownloadError(f"{shown}: server answered HTTP {status}{_status_hint(status)}")
            length = response.getheader("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if total is not None and total > max_bytes:
                raise TooLarge(f"{shown}: {human_size(total)} is over the limit of {human_size(max_bytes)}")
            suggested = _suggested_name(response.getheader("Content-Disposition"), final_url)
            content_type = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
            target = choose_target(suggested)
            _stream_to(response, target, shown, max_bytes, progress, total, watchdog)
            return Downloaded(target, content_type, suggested)
    except ssl.SSLError as error:
        if watchdog.fired is None:
            raise DownloadError(f"{shown}: the secure connection failed ({error.reason or type(error).__name__})"
                                ) from None
        raise _watchdog_error(watchdog, shown, limit) from None
    except (OSError, http.client.HTTPException, _ReadFailed) as failure:
        cause: BaseException = failure
        if isinstance(failure, _ReadFailed) and failure.__cause__ is not None:
            cause = failure.__cause__
        if watchdog.fired is not None:
            raise _watchdog_error(watchdog, shown, limit) from None
        if isinstance(cause, TimeoutError):
            raise _Transient(f"{shown}: timed out after {timeout[0]:.0f}s to connect / {timeout[1]:.0f}s to read"
                             ) from None
        raise _Transient(f"{shown}: could not connect or the connection broke ({type(cause).__name__})") from None
    finally:
        watchdog.close()


def _watchdog_error(watchdog: _Watchdog, shown: str, limit: float) -> Exception:
    if watchdog.fired == "cancelled":
        return DownloadCancelled(f"{shown}: the download was cancelled")
    return DownloadError(f"{shown}: the download took longer than the limit of {limit:g}s ({ENV_DOWNLOAD_DEADLINE})")


def _open(url: str, shown: str, timeout: tuple[float, float], watchdog: _Watchdog,
          allowed: _Allowed) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection, str]:
    """Send the GET, following redirects; every hop's host is resolved and checked before it is contacted."""
    first_origin = None
    for _hop in range(MAX_REDIRECTS + 1):
        try:
            parts = urlsplit(url)
            scheme = parts.scheme.lower()
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise DownloadError(f"{shown}: not a valid URL (its host or port cannot be read)") from None
        if scheme not in ("http", "https") or not parts.hostname:
            raise DownloadError(f"{shown}: redirected to {redact_url(url)!r}, which is not an http(s) URL")
        origin = (scheme, parts.hostname.lower(), port)
        first_origin = first_origin or origin
        addresses = resolve_checked(parts.hostname, port, shown, allowed)
        headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity", "Accept": "*/*"}
        if parts.username is not None and origin == first_origin:
            # Credentials in the URL are sent to the host they were written for only, never after a redirect.
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        connection_class = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
        path = parts.path or "/"
        if parts.query:
            path += f"?{parts.query}"
        response = None
        for index, address in enumerate(addresses):
            connection = connection_class(parts.hostname, port, address, timeout)
            try:
                connection.connect()
                watchdog.watch(connection.sock)
                connection.request("GET", path, headers=headers)
                response = connection.getresponse()
                break
            except http.client.InvalidURL:  # control characters in the path: never sent
                connection.close()
                raise DownloadError(f"{shown}: not a valid URL (it contains control characters)") from None
            except ConnectionRefusedError:
                connection.close()
                if index == len(addresses) - 1:
                    raise
        assert response is not None
        if response.status not in _REDIRECTS:
            return response, connection, url
        location = response.getheader("Location")
        response.close()
        connection.close()
        if not location:
            raise DownloadError(f"{shown}: server answered HTTP {response.status} without a Location")
        url = urljoin(url, location)
    raise DownloadError(f"{shown}: more than {MAX_REDIRECTS} redirects")


def _status_hint(status: int) -> str:
    if status == 404:
        return " (not found: check the URL)"
    if status in (401, 403):
        return " (access denied: is the link public or still valid?)"
    if status == 410:
        return " (gone: the link has expired)"
    return ""


def _retry_after(response: http.client.HTTPResponse) -> str | None:
    return (response.getheader("Retry-After") or "").strip() or None


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


class _ReadFailed(Exception):
    """The connection failed while the body arrived (told apart from failures to write the file)."""


def _read(response: http.client.HTTPResponse) -> bytes:
    try:
        return response.read1(CHUNK)
    except (OSError, http.client.HTTPException) as error:
        raise _ReadFailed() from error


def _stream_to(response: http.client.HTTPResponse, target: Path, shown: str, max_bytes: int, progress: bool,
               total: int | None, watchdog: _Watchdog) -> Path:
    from tqdm.auto import tqdm

    received = 0
    try:
        with atomic_path(target) as tmp, open(tmp, "wb") as handle, tqdm(
            total=total, unit="B", unit_scale=True, desc=target.name, disable=not progress, leave=False
        ) as bar:
            while True:
                chunk = _read(response)
                if not chunk:
                    if watchdog.fired:  # the watchdog shut the socket: an end of the body it caused
                        raise _ReadFailed()
                    break
                received += len(chunk)
                if received > max_bytes:
                    raise TooLarge(f"{shown}: more than the limit of {human_size(max_bytes)}")
                handle.write(chunk)
                bar.update(len(chunk))
            if total is not None and received < total:
                raise _Transient(f"{shown}: connection closed after {received} of {total} bytes")
    except OSError as error:  # the network's errors arrive as _ReadFailed: these are the disk's
        raise write_error(error, target) from None
    return target
