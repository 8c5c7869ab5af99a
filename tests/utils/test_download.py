"""The outbound client against real local servers: address checks at every hop, pinned connections, byte caps, the
overall deadline, cancellation inside a blocked read, and nothing left behind by a failed fetch."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time

import pytest

from trainer.utils import download as client
from trainer.utils.download import (
    ENV_ALLOW_PRIVATE_HOSTS,
    DownloadCancelled,
    DownloadError,
    RefusedDestination,
    address_kind,
    allowed_destinations,
    download,
    stop_downloads_on,
)


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else []


# ---------------------------------------------------------------------------------------------- addresses
@pytest.mark.parametrize("host", ["127.0.0.1", "127.1", "0x7f.1", "0x7f000001", "2130706433", "017700000001",
                                  "localhost", "LOCALHOST.", "[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]",
                                  "0.0.0.0", "0"])
def test_loopback_in_every_spelling_is_refused_and_never_contacted(host, internal_server, tmp_path):
    url = internal_server.url("/secret", host=host)
    with pytest.raises(RefusedDestination, match=r"is a (loopback|unspecified) address .* TRAINER_ALLOW_PRIVATE"):
        download(url, tmp_path / "out.bin", retries=0)
    assert internal_server.connections == 0 and internal_server.requests == []
    assert _files(tmp_path) == []


@pytest.mark.parametrize(("address", "kind"), [
    ("10.1.2.3", "private"), ("192.168.0.1", "private"), ("172.16.5.4", "private"), ("169.254.169.254", "link-local"),
    ("100.64.0.1", "non-public"), ("224.0.0.1", "multicast"), ("240.0.0.1", "reserved"), ("fe80::1", "link-local"),
    ("fc00::1", "private"), ("ff02::1", "multicast"), ("::", "unspecified"), ("2002:7f00:1::", "loopback"),
    ("64:ff9b::a9fe:a9fe", "link-local"), ("2001::8000:ffff:80ff:fffe", "loopback"),
])
def test_internal_address_kinds(address, kind):
    """Mapped, 6to4, Teredo and NAT64 addresses are judged by the IPv4 address they lead to."""
    assert address_kind(ipaddress.ip_address(address)) == kind
    assert address_kind(ipaddress.ip_address("93.184.216.34")) is None
    assert address_kind(ipaddress.ip_address("2606:2800:220:1:248:1893:25c8:1946")) is None


def test_metadata_endpoint_is_refused_before_any_connection(monkeypatch, tmp_path):
    connects = []
    monkeypatch.setattr(client.socket, "create_connection", lambda *a, **k: connects.append(a) or 1 / 0)
    for url in ("http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/latest/",
                "http://10.0.0.1:8080/admin"):
        with pytest.raises(RefusedDestination):
            download(url, tmp_path / "x", retries=0)
    assert connects == []


def test_redirects_are_checked_at_every_hop(allowed_server, internal_server, tmp_path):
    """An allowed server that redirects into loopback (any spelling) is refused at that hop."""
    for target in (internal_server.url("/admin"), internal_server.url("/admin", host="127.1"),
                   internal_server.url("/admin", host="localhost")):
        first = allowed_server.redirect("/hop", target)
        second = allowed_server.redirect("/start", first, status=301)
        with pytest.raises(RefusedDestination, match=r"loopback address"):
            download(second, tmp_path / "out.bin", retries=0)
    assert internal_server.connections == 0
    assert [path for path, _ in allowed_server.requests] == ["/start", "/hop"] * 3
    assert _files(tmp_path) == []


@pytest.mark.parametrize(("target", "kind"), [
    ("http://10.0.0.7/admin", "private"), ("http://192.168.1.1/", "private"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"), ("http://[fd00:ec2::254]/latest/", "private"),
    ("http://100.64.0.1/", "non-public"),
])
def test_a_redirect_into_a_private_or_link_local_network_is_refused_unconnected(target, kind, allowed_server,
                                                                                monkeypatch, tmp_path):
    """The hop after a public (here: allowed) server is judged like the first URL: nothing is connected to."""
    start = allowed_server.redirect("/start", target, status=307)
    real_connect = client.socket.create_connection
    tried = []

    def connect(address, *args, **kwargs):
        tried.append(address[0])
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(client.socket, "create_connection", connect)
    with pytest.raises(RefusedDestination, match=rf"is a {kind} address"):
        download(start, tmp_path / "out.bin", retries=0)
    assert tried and set(tried) == {"127.0.0.1"}, f"connected to {tried}: only the first hop may be"
    assert _files(tmp_path) == []


def test_an_allowed_redirect_is_followed_and_credentials_stay_with_their_host(allowed_server, monkeypatch, tmp_path):
    other = type(allowed_server)()
    try:
        monkeypatch.setenv(ENV_ALLOW_PRIVATE_HOSTS, f"127.0.0.1:{allowed_server.port} 127.0.0.1:{other.port}")
        final = other.serve("/file.bin", b"payload")
        start = allowed_server.redirect("/start", final).replace("http://", "http://alice:s3cret@")
        assert download(start, tmp_path / "out.bin", retries=0).read_bytes() == b"payload"
        assert "Authorization" in allowed_server.requests[0][1]
        assert "Authorization" not in other.requests[0][1], "credentials were forwarded to another host"
    finally:
        other.close()


def test_too_many_redirects(allowed_server, tmp_path):
    allowed_server.redirect("/loop", allowed_server.url("/loop"))
    with pytest.raises(DownloadError, match="more than 5 redirects"):
        download(allowed_server.url("/loop"), tmp_path / "x", retries=0)
    assert len(allowed_server.requests) == 6


def test_the_allowance_is_exact(allowed_server, internal_server, monkeypatch, tmp_path):
    """127.0.0.1:<port> admits that port only; a CIDR or a host name entry admits what it names."""
    url = internal_server.serve("/x", b"ok")
    with pytest.raises(RefusedDestination):
        download(url, tmp_path / "a", retries=0)
    monkeypatch.setenv(ENV_ALLOW_PRIVATE_HOSTS, "127.0.0.0/8")
    assert download(url, tmp_path / "b", retries=0).read_bytes() == b"ok"
    monkeypatch.setenv(ENV_ALLOW_PRIVATE_HOSTS, f"localhost:{internal_server.port}")
    with pytest.raises(RefusedDestination):  # the name is allowed, not the address it happens to have
        download(url, tmp_path / "c", retries=0)
    with pytest.raises(ValueError, match=r"TRAINER_ALLOW_PRIVATE_HOSTS: '10.0.0.0/33' is not a host"):
        allowed_destinations("10.0.0.0/33")
    with pytest.raises(ValueError, match="has a port that is not a number"):
        allowed_destinations("host:http")


def test_the_connection_goes_to_the_address_that_was_checked(monkeypatch, tmp_path):
    """DNS rebinding: a second lookup answering 127.0.0.1 is never made; the checked public address is dialled."""
    answers = iter([[(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 80))],
                    [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 80))]])
    lookups, dialled = [], []
    monkeypatch.setattr(client.socket, "getaddrinfo", lambda host, *a, **k: lookups.append(host) or next(answers))

    def create_connection(address, *args, **kwargs):
        dialled.append(address)
        raise ConnectionRefusedError("test: no network")

    monkeypatch.setattr(client.socket, "create_connection", create_connection)
    with pytest.raises(DownloadError, match="could not connect"):
        download("http://rebind.example/x.zip", tmp_path / "x", retries=0)
    assert lookups == ["rebind.example"] and dialled == [("93.184.216.34", 80)]


# ---------------------------------------------------------------------------------------------- limits
def test_byte_cap_on_the_declared_and_on_the_real_length(allowed_server, tmp_path):
    declared = allowed_server.serve("/big", b"x" * 5000)
    with pytest.raises(DownloadError, match=r"4.9 KiB is over the limit of 1.0 KiB"):
        download(declared, tmp_path / "a", max_bytes=1024, retries=0)

    def chunked_without_length(handler):
        handler.send_response(200)
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        for _ in range(8):
            handler.wfile.write(b"400\r\n" + b"y" * 1024 + b"\r\n")
        handler.wfile.write(b"0\r\n\r\n")

    allowed_server.routes["/stream"] = chunked_without_length
    with pytest.raises(DownloadError, match=r"more than the limit of 2\.0 KiB"):
        download(allowed_server.url("/stream"), tmp_path / "b", max_bytes=2048, retries=0)
    assert _files(tmp_path) == []
    assert download(allowed_server.url("/stream"), tmp_path / "c", retries=0).stat().st_size == 8192


def _trickle(handler, stop: threading.Event, interval: float = 0.2) -> None:
    """A slowloris answer: a huge declared length, then one byte per interval."""
    handler.send_response(200)
    handler.send_header("Content-Length", "1000000")
    handler.end_headers()
    while not stop.wait(interval):
        handler.wfile.write(b"x")
        handler.wfile.flush()


def test_a_slowloris_server_meets_the_overall_deadline(allowed_server, monkeypatch, tmp_path):
    """Each byte arrives well within the read timeout; only the deadline ends the download."""
    stop = threading.Event()
    allowed_server.routes["/slow"] = lambda handler: _trickle(handler, stop)
    monkeypatch.setenv(client.ENV_DOWNLOAD_DEADLINE, "1.5")
    try:
        with pytest.raises(DownloadError, match=r"took longer than the limit of 1.5s \(TRAINER_DOWNLOAD_DEADLINE\)"):
            download(allowed_server.url("/slow"), tmp_path / "slow.bin", retries=3, timeout=(5.0, 5.0))
    finally:
        stop.set()
    assert _files(tmp_path) == []
    assert len(allowed_server.requests) == 1, "a deadline is final: no retry after it"


def test_cancel_interrupts_a_hung_read_within_a_second(allowed_server, tmp_path):
    """The answer's headers arrive, then nothing: without the watchdog the read would wait for the 60 s timeout."""
    hang = threading.Event()

    def hung(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", "100")
        handler.end_headers()
        hang.wait(30)

    allowed_server.routes["/hung"] = hung
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    started = time.monotonic()
    try:
        with stop_downloads_on(stop), pytest.raises(DownloadCancelled):
            download(allowed_server.url("/hung"), tmp_path / "hung.bin", timeout=(10.0, 60.0))
    finally:
        hang.set()
    assert time.monotonic() - started < 10, "the cancellation waited for the read timeout"
    assert _files(tmp_path) == []


def test_a_cancel_between_retries_ends_the_wait(allowed_server, tmp_path):
    def unavailable(handler):
        handler.send_response(503)
        handler.send_header("Content-Length", "0")
        handler.send_header("Retry-After", "30")
        handler.end_headers()

    allowed_server.routes["/busy"] = unavailable
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    started = time.monotonic()
    with stop_downloads_on(stop), pytest.raises(DownloadCancelled):
        download(allowed_server.url("/busy"), tmp_path / "busy.bin", retries=3)
    assert time.monotonic() - started < 10
    assert len(allowed_server.requests) == 1


def test_a_connection_cut_mid_body_leaves_no_file(allowed_server, tmp_path):
    def cut(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        handler.wfile.write(b"x" * 100)
        handler.close_connection = True

    allowed_server.routes["/cut"] = cut
    with pytest.raises(DownloadError, match=r"(connection closed after 100 of 1000 bytes|connection broke)"):
        download(allowed_server.url("/cut"), tmp_path / "cut.bin", retries=1, backoff=0.01)
    assert len(allowed_server.requests) == 2
    assert _files(tmp_path) == []


def test_a_url_whose_port_cannot_be_read_is_a_clear_error(tmp_path):
    with pytest.raises(DownloadError, match=r"not a valid URL \(its host or port cannot be read\)"):
        download("http://127.0.0.1:99999/x", tmp_path / "x", retries=0)


def test_only_http_and_https(allowed_server, tmp_path):
    allowed_server.redirect("/to-file", "file:///etc/passwd")
    with pytest.raises(DownloadError, match=r"redirected to 'file:///etc/passwd', which is not an http\(s\) URL"):
        download(allowed_server.url("/to-file"), tmp_path / "x", retries=0)


def test_a_full_disk_names_the_file(allowed_server, monkeypatch, tmp_path):
    url = allowed_server.serve("/f", b"data")
    import errno

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    class FullFile:
        def __init__(self, *a, **k):
            pass

        write = full

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(client, "open", FullFile, raising=False)
    with pytest.raises(ValueError, match=r"the disk is full: could not write .*/cache/f.bin \(free space in"):
        download(url, tmp_path / "cache" / "f.bin", retries=2)
    assert len(allowed_server.requests) == 1, "a full disk is not retried"
    assert _files(tmp_path / "cache") == []


def test_secrets_are_redacted_from_text_values_and_log_records():
    import logging

    from trainer.utils.download import redact_text, redact_values
    from trainer.utils.logs import RedactSecrets

    text = "a https://alice:hunter2@h.example/p.zip?X-Amz-Signature=SIG | http://plain.example/x.zip, s3://b/k"
    assert redact_text(text) == "a https://h.example/p.zip?… | http://plain.example/x.zip, s3://b/k"
    assert redact_values({"urls": [text], "n": 3}) == {"urls": [redact_text(text)], "n": 3}
    try:
        raise ValueError("fetching https://u:pw@h.example/a?sig=SIG failed")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "source %s", ("https://h.example/b?token=TOK",),
                                   exc_info=__import__("sys").exc_info())
    assert RedactSecrets().filter(record)
    formatted = logging.Formatter().format(record)
    assert "SIG" not in formatted and "TOK" not in formatted and "pw@" not in formatted
    assert "https://h.example/b?…" in formatted and "https://h.example/a?…" in formatted
