"""One way to run a test HTTP server on 127.0.0.1 that counts the TCP connections it accepts."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def start_counting_server(handler: type[BaseHTTPRequestHandler], on_connect: Callable[[], None]
                          ) -> ThreadingHTTPServer:
    """Serve ``handler`` from a daemon thread; ``on_connect`` runs for every accepted connection, before any byte is
    read, so that a test can prove a refused address was never contacted."""

    class Counting(ThreadingHTTPServer):
        daemon_threads = True

        def verify_request(self, request, client_address) -> bool:
            on_connect()
            return True

    httpd = Counting(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return httpd
