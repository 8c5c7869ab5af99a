"""Running and talking to the real cog HTTP server (coglet), as the smoke script and the end-to-end tests do.

:meth:`CogServer.start` launches ``python -m cog.server.http`` in a subprocess the way a cog image does: the
entry point comes from ``COG_TRAIN_TYPE_STUB`` / ``COG_PREDICT_TYPE_STUB``, the port is picked by the OS and read
from the server's ``Starting coglet server on HOST:PORT`` line. coglet starts its worker with whatever ``python`` is
first on ``PATH`` (a python without cog leaves the server in STARTING for ever), so the interpreter's folder is put
first.

:class:`FileServer` serves a local folder over http on 127.0.0.1, so training images and trained zips can be given
to the server as URLs, as users give them.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

from trainer.utils.download import download

logger = logging.getLogger(__name__)

_PORT_LINE = re.compile(r"Starting coglet server on [^\s:]+:(\d+)")


class CogServerError(RuntimeError):
    """The server did not start or answered something unexpected; the message carries its log tail."""


class CogServer:
    def __init__(self, base_url: str, process: subprocess.Popen | None = None, log_path: Path | None = None,
                 echo: Callable[[str], None] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.process = process
        self.log_path = log_path
        self.echo = echo
        self._lines: list[str] = []
        self._port: int | None = None
        self._port_seen = threading.Event()

    # ------------------------------------------------------------------------------------------ life cycle
    @classmethod
    def start(cls, *, mode: str, ref: str, cwd: Path, env: dict[str, str] | None = None,
              python: str | None = None, log_path: Path | None = None, upload_url: str | None = None,
              echo: Callable[[str], None] | None = None, timeout: float = 300.0) -> CogServer:
        """Start the server in ``mode`` ("train" or "predict") for ``ref`` (``train.py:train``) and wait for READY."""
        if mode not in ("train", "predict"):
            raise ValueError(f"mode must be 'train' or 'predict', got {mode!r}")
        python = python or sys.executable
        stub = "COG_TRAIN_TYPE_STUB" if mode == "train" else "COG_PREDICT_TYPE_STUB"
        child_env = {**os.environ, **(env or {})}
        child_env.update({"PORT": "0", stub: ref, "PYTHONUNBUFFERED": "1"})
        child_env["PATH"] = os.pathsep.join([str(Path(python).parent), child_env.get("PATH", "")])
        command = [python, "-m", "cog.server.http", "--host", "127.0.0.1"]
        if mode == "train":
            command += ["--x-mode", "train"]
        if upload_url:
            command += ["--upload-url", upload_url]
        process = subprocess.Popen(command, cwd=str(cwd), env=child_env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        server = cls("http://127.0.0.1:0", process, log_path, echo)
        threading.Thread(target=server._read_output, name="cog-server-log", daemon=True).start()
        try:
            deadline = time.monotonic() + timeout
            while not server._port_seen.wait(0.2):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise CogServerError(f"the cog server did not start:\n{server.log_tail()}")
            server.base_url = f"http://127.0.0.1:{server._port}"
            server.wait_ready(max(1.0, deadline - time.monotonic()))
        except BaseException:
            server.stop()
            raise
        return server

    def _read_output(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        sink = self.log_path.open("a", encoding="utf-8") if self.log_path else None
        try:
            for line in self.process.stdout:
                self._lines.append(line)
                del self._lines[:-400]
                if sink:
                    sink.write(line)
                    sink.flush()
                if self._port is None and (match := _PORT_LINE.search(line)):
                    self._port = int(match.group(1))
                    self._port_seen.set()
                if self.echo is not None and (message := job_log_message(line)) is not None:
                    self.echo(message)
        finally:
            if sink:
                sink.close()

    def log_tail(self, lines: int = 60) -> str:
        return "".join(self._lines[-lines:])

    def wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        last: dict = {}
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise CogServerError(f"the cog server exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(Exception):
                last = self.health()
                if last.get("status") == "READY":
                    return last
                if last.get("status") in ("SETUP_FAILED", "DEFUNCT"):
                    logs = (last.get("setup") or {}).get("logs", "")
                    raise CogServerError(f"the cog server's set-up failed ({last['status']}):\n{logs[-6000:]}")
            time.sleep(0.25)
        raise CogServerError(f"the cog server was not READY after {timeout:.0f}s (last: {last.get('status')}):\n"
                             f"{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(Exception):
            self.request("POST", "/shutdown", timeout=5)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def __enter__(self) -> CogServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------- requests
    def request(self, method: str, path: str, payload: Any = None, headers: dict | None = None,
                timeout: float = 600.0):
        import requests

        response = requests.request(method, self.base_url + path, json=payload, headers=headers, timeout=timeout)
        return response

    def health(self) -> dict:
        return self.request("GET", "/health-check", timeout=5).json()

    def submit(self, kind: str, inputs: dict, *, job_id: str | None = None, webhook: str | None = None,
               webhook_events: list[str] | None = None, asynchronous: bool = False, timeout: float = 3600.0,
               busy_wait: float = 10.0) -> dict:
        """POST /trainings or /predictions (``kind``); a synchronous call returns the finished job.

        ``busy_wait``: seconds to keep retrying while the server answers 409 (busy).
        """
        payload: dict[str, Any] = {"input": inputs}
        if job_id:
            payload["id"] = job_id
        if webhook:
            payload["webhook"] = webhook
        if webhook_events:
            payload["webhook_events_filter"] = webhook_events
        headers = {"Prefer": "respond-async"} if asynchronous else None
        # The server answers 409 while its slot is busy, which includes the moment between answering one
        # synchronous request and taking the next: wait for the slot rather than fail.
        deadline = time.monotonic() + busy_wait
        while True:
            response = self.request("POST", f"/{kind}", payload, headers=headers, timeout=timeout)
            if response.status_code != 409 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if response.status_code not in (200, 202):
            raise CogServerError(f"POST /{kind} answered HTTP {response.status_code}: {response.text[:2000]}")
        return response.json()

    def train(self, inputs: dict, **options) -> dict:
        return self.submit("trainings", inputs, **options)

    def predict(self, inputs: dict, **options) -> dict:
        return self.submit("predictions", inputs, **options)

    def cancel(self, kind: str, job_id: str) -> int:
        return self.request("POST", f"/{kind}/{job_id}/cancel", timeout=30).status_code


def job_log_message(line: str) -> str | None:
    """The user-code log line in one of coglet's JSON log records, or None for the server's own records."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    fields = record.get("fields") or {}
    if record.get("target") == "coglet::prediction" and fields.get("source") in ("Stdout", "Stderr"):
        return str(fields.get("message", ""))
    return None


# ============================================================================================== outputs
def decode_data_url(value: str) -> bytes:
    """The bytes of a ``data:<type>;base64,<data>`` URL (how cog returns files without an upload URL)."""
    if not value.startswith("data:") or ";base64," not in value[:200]:
        raise ValueError(f"not a base64 data URL: {value[:60]!r}")
    return base64.b64decode(value.split(",", 1)[1])


def save_output(value: str, target: Path) -> Path:
    """Write a file output (data URL, http URL or local path) to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if value.startswith("data:"):
        target.write_bytes(decode_data_url(value))
    elif value.startswith(("http://", "https://")):
        download(value, target)
    else:
        target.write_bytes(Path(value).read_bytes())
    return target


# ============================================================================================== file server
class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:
        logger.debug("file server: " + format, *args)


class FileServer:
    """Serve ``folder`` at ``http://127.0.0.1:<port>/`` from a background thread."""

    def __init__(self, folder: Path, host: str = "127.0.0.1") -> None:
        self.folder = Path(folder)
        handler = functools.partial(_QuietHandler, directory=str(self.folder))
        self.httpd = ThreadingHTTPServer((host, 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="file-server", daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def url(self, relative: str | Path) -> str:
        return f"{self.base_url}/{quote(Path(relative).as_posix())}"

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``: what a server's ``TRAINER_ALLOW_PRIVATE_HOSTS`` names to fetch from this one only."""
        return self.base_url.removeprefix("http://")

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> FileServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
