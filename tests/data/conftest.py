"""Fixtures of the data tests: a watched sandbox, a local HTTP server, a real S3-compatible server, tiny models."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler

import pytest
from hypothesis import settings

from tests.data.factories import Sandbox, make_sandbox
from tests.local_http import start_counting_server
from trainer.utils.download import ENV_ALLOW_PRIVATE_HOSTS

# Property tests keep no example database in the work tree: each run draws afresh (CI runs on fresh clones anyway).
settings.register_profile("trainer-data", database=None, deadline=None)
settings.load_profile("trainer-data")


@pytest.fixture
def sandbox(tmp_path, monkeypatch) -> Sandbox:
    return make_sandbox(tmp_path, monkeypatch)


# -------------------------------------------------------------------------------------------------- http server
@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    fail_first: int = 0
    """Answer HTTP 503 this many times before the real answer (retry tests)."""
    delay: float = 0.0
    """Seconds to wait before answering (timeout tests)."""


class FileServer:
    """A threaded HTTP server on 127.0.0.1 serving in-memory routes, counting requests per path."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: Counter = Counter()
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                server.hits[path] += 1
                route = server.routes.get(path)
                if route is None:
                    self.send_error(404)
                    return
                if route.delay:
                    time.sleep(route.delay)
                if server.hits[path] <= route.fail_first:
                    self.send_error(503)
                    return
                self.send_response(route.status)
                self.send_header("Content-Length", str(len(route.body)))
                for key, value in route.headers.items():
                    self.send_header(key, value)
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up (timeouts)
                    self.wfile.write(route.body)

        def count() -> None:
            server.connections += 1

        self.connections = 0
        self.httpd = start_counting_server(Handler, count)

    @property
    def base(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str, query: str = "") -> str:
        return f"{self.base}{path}" + (f"?{query}" if query else "")

    def add(self, path: str, body: bytes = b"", **options) -> str:
        self.routes[path] = Route(body=body, **options)
        return self.url(path)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_server(monkeypatch):
    """The server, reachable by the downloader: the operator's allowance names this one address and port only."""
    server = FileServer()
    monkeypatch.setenv(ENV_ALLOW_PRIVATE_HOSTS, server.base.removeprefix("http://"))
    yield server
    server.close()


@pytest.fixture
def forbidden_server():
    """A server on 127.0.0.1 that no allowance names: downloads must never reach it (its hits stay zero)."""
    server = FileServer()
    yield server
    server.close()


# ---------------------------------------------------------------------------------------------------- S3 server
@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """Test credentials in the environment, and no shared AWS files or instance metadata to fall back on."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTKEY000000001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-value-do-not-print")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)


# ------------------------------------------------------------------------------------------------- tiny models
@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Randomly initialised CLIPSeg, BLIP and Florence-2 saved as local folders (built lazily, once)."""
    from tests.data import tiny_models as builders

    root = tmp_path_factory.mktemp("tiny-data-models")
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = getattr(builders, f"build_{name}")(root / name)
        return cache[name]

    return get
