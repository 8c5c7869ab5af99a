"""Local servers for the outbound client: one the operator allows, one that must never be reached."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler

import pytest

from tests.local_http import start_counting_server
from trainer.utils.download import ENV_ALLOW_PRIVATE_HOSTS

Behaviour = Callable[[BaseHTTPRequestHandler], None]


class ScriptedServer:
    """An HTTP server on 127.0.0.1 whose paths run test-given behaviours; it records every TCP connection and
    every request (path and headers), so a test can prove a refused server was never contacted."""

    def __init__(self) -> None:
        self.routes: dict[str, Behaviour] = {}
        self.connections = 0
        self.requests: list[tuple[str, dict[str, str]]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                owner.requests.append((self.path, dict(self.headers)))
                behaviour = owner.routes.get(self.path.split("?", 1)[0])
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    if behaviour is None:
                        self.send_response(404)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                    else:
                        behaviour(self)

        def count() -> None:
            owner.connections += 1

        self.httpd = start_counting_server(Handler, count)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def serve(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> str:
        def behaviour(handler: BaseHTTPRequestHandler) -> None:
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                handler.send_header(key, value)
            handler.end_headers()
            handler.wfile.write(body)

        self.routes[path] = behaviour
        return self.url(path)

    def redirect(self, path: str, location: str, status: int = 302) -> str:
        def behaviour(handler: BaseHTTPRequestHandler) -> None:
            handler.send_response(status)
            handler.send_header("Location", location)
            handler.send_header("Content-Length", "0")
            handler.end_headers()

        self.routes[path] = behaviour
        return self.url(path)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def _no_allowance(monkeypatch):
    """No private address is allowed unless a test's server fixture says so."""
    monkeypatch.delenv(ENV_ALLOW_PRIVATE_HOSTS, raising=False)


@pytest.fixture
def allowed_server(monkeypatch):
    """A server the operator allows by its exact address and port (the only allowance the tests use)."""
    server = ScriptedServer()
    monkeypatch.setenv(ENV_ALLOW_PRIVATE_HOSTS, f"127.0.0.1:{server.port}")
    yield server
    server.close()


@pytest.fixture
def internal_server():
    """A server on loopback that stands for an internal service: no allowance names it."""
    server = ScriptedServer()
    yield server
    server.close()
