"""A Hugging Face hub on 127.0.0.1, speaking the routes that huggingface_hub 2.4 and the trainer's guarded client use.

- ``/api/models/<repo>[/revision/<rev>]``: the repo's info; with ``?blobs=true`` each sibling carries its size and,
  for LFS files, ``lfs: {sha256, size, pointerSize}``;
- ``/api/models/<repo>/tree/<rev>[/<path>]``: the tree listing of ``list_repo_tree`` (``?recursive=true``);
- ``HEAD``/``GET /<repo>/resolve/<rev>/<file>``: the file, with ``X-Repo-Commit``, ``ETag`` (the git blob id), and for
  LFS files ``X-Linked-Etag`` (the sha256) and ``X-Linked-Size``, as ``get_hf_file_metadata`` reads them.

A missing repo answers 401 with ``X-Error-Code: RepoNotFound``, a missing file 404 with ``EntryNotFound``, as the hub
does. Files may be virtual (a size whose zeros are generated only if someone asks), so a repo can list a 40 GB
checkpoint beside the files a loader really fetches. Every request is recorded; a test can make file responses slow,
stall or lie about their size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from dataclasses import dataclass, field
from functools import cached_property
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from tests.local_http import start_counting_server

LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx", ".h5")
CHUNK = 1 << 16


@dataclass
class FakeFile:
    size: int
    data: bytes | None = None
    """None: ``size`` zero bytes, generated when served."""

    def chunks(self):
        if self.data is not None:
            yield self.data
            return
        left = self.size
        while left:
            n = min(CHUNK, left)
            yield bytes(n)
            left -= n

    @property
    def content(self) -> bytes:
        return self.data if self.data is not None else bytes(self.size)

    @cached_property
    def blob_id(self) -> str:
        if self.data is None:  # never hash gigabytes of zeros: nobody checks a virtual file's id
            return hashlib.sha1(f"virtual {self.size}".encode()).hexdigest()
        return hashlib.sha1(f"blob {self.size}\0".encode() + self.data).hexdigest()

    @cached_property
    def sha256(self) -> str:
        if self.data is None:
            return hashlib.sha256(f"virtual {self.size}".encode()).hexdigest()
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class FakeRepo:
    repo_id: str
    files: dict[str, FakeFile]
    commit: str = ""
    extra_listing: list[dict] = field(default_factory=list)
    """Raw sibling entries added to the info answer (a hostile listing)."""

    def __post_init__(self) -> None:
        digest = hashlib.sha1(self.repo_id.encode())
        for name in sorted(self.files):
            digest.update(f"{name}:{self.files[name].size}".encode())
        self.commit = digest.hexdigest()

    def is_lfs(self, name: str) -> bool:
        return name.endswith(LFS_SUFFIXES)

    def sibling(self, name: str, blobs: bool) -> dict:
        entry: dict = {"rfilename": name}
        if blobs:
            file = self.files[name]
            entry.update(size=file.size, blobId=file.blob_id)
            if self.is_lfs(name):
                entry["lfs"] = {"sha256": file.sha256, "size": file.size, "pointerSize": 134}
        return entry

    def tree_entries(self, path: str, recursive: bool) -> list[dict]:
        prefix = f"{path}/" if path else ""
        entries, folders = [], set()
        for name in sorted(self.files):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                if recursive or depth == 1:
                    folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                file = self.files[name]
                entry = {"type": "file", "oid": file.blob_id, "size": file.size, "path": name}
                if self.is_lfs(name):
                    entry["lfs"] = {"oid": file.sha256, "size": file.size, "pointerSize": 134}
                entries.append(entry)
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)]
        return entries


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.connections = 0
        self.delay = 0.0
        """Seconds every file response waits before its headers."""
        self.stalls: set[str] = set()
        """Files whose body stops after the first bytes and never ends (until the hub closes)."""
        self.oversized: set[str] = set()
        """Files served with more bytes than the listing says."""
        self.closing = threading.Event()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self._answer(head=True)

            def do_GET(self) -> None:
                self._answer(head=False)

            def _answer(self, head: bool) -> None:
                hub.requests.append((self.command, self.path, dict(self.headers)))
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    hub.route(self, head)

        def count() -> None:
            hub.connections += 1

        self.httpd = start_counting_server(Handler, count)

    # --------------------------------------------------------------------------------------------- set-up
    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, repo_id: str, files: dict[str, bytes | int]) -> FakeRepo:
        """A repo of ``files`` (name -> content, or a size for a virtual file of zeros)."""
        repo = FakeRepo(repo_id, {name: FakeFile(len(v), v) if isinstance(v, bytes) else FakeFile(v)
                                  for name, v in files.items()})
        self.repos[repo_id] = repo
        return repo

    def add_folder(self, repo_id: str, folder: Path, extra: dict[str, bytes | int] | None = None) -> FakeRepo:
        files: dict[str, bytes | int] = {
            p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()
        }
        return self.add(repo_id, {**files, **(extra or {})})

    def fetched(self, repo_id: str) -> list[str]:
        """Files of ``repo_id`` whose content was asked for (GET on resolve), in order."""
        prefix = f"/{repo_id}/resolve/"
        names = []
        for method, path, _headers in self.requests:
            path = unquote(urlsplit(path).path)
            if method == "GET" and path.startswith(prefix):
                names.append(path[len(prefix):].split("/", 1)[1])
        return names

    def close(self) -> None:
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    # --------------------------------------------------------------------------------------------- routes
    def route(self, handler: BaseHTTPRequestHandler, head: bool) -> None:
        parts = urlsplit(handler.path)
        path = unquote(parts.path)
        query = parse_qs(parts.query)
        segments = path.strip("/").split("/")
        if segments[:2] == ["api", "models"] and len(segments) >= 4:
            repo = self.repos.get("/".join(segments[2:4]))
            if repo is None:
                return self._repo_not_found(handler)
            rest = segments[4:]
            if not rest or (rest[0] == "revision" and len(rest) == 2):
                if rest and rest[1] not in ("main", repo.commit):
                    return self._error(handler, 404, "RevisionNotFound", repo)
                return self._info(handler, repo, blobs=query.get("blobs", ["false"])[0].lower() == "true")
            if rest[0] == "tree" and len(rest) >= 2:
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                return self._json(handler, repo.tree_entries("/".join(rest[2:]), recursive))
            return self._error(handler, 404, "EntryNotFound", repo)
        if len(segments) >= 5 and segments[2] == "resolve":
            repo = self.repos.get("/".join(segments[:2]))
            if repo is None:
                return self._repo_not_found(handler)
            if segments[3] not in ("main", repo.commit):
                return self._error(handler, 404, "RevisionNotFound", repo)
            name = "/".join(segments[4:])
            if name not in repo.files:
                return self._error(handler, 404, "EntryNotFound", repo)
            return self._file(handler, repo, name, head)
        return self._error(handler, 404, "EntryNotFound", None)

    def _info(self, handler, repo: FakeRepo, blobs: bool) -> None:
        siblings = [repo.sibling(name, blobs) for name in sorted(repo.files)] + repo.extra_listing
        self._json(handler, {"_id": "0" * 24, "id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.commit,
                             "private": False, "gated": False, "disabled": False, "tags": [],
                             "siblings": siblings})

    def _json(self, handler, value) -> None:
        body = json.dumps(value).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _error(self, handler, status: int, code: str, repo: FakeRepo | None) -> None:
        body = json.dumps({"error": code}).encode()
        handler.send_response(status)
        handler.send_header("X-Error-Code", code)
        handler.send_header("X-Error-Message", code)
        if repo is not None:
            handler.send_header("X-Repo-Commit", repo.commit)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _repo_not_found(self, handler) -> None:
        self._error(handler, 401, "RepoNotFound", None)

    def _file(self, handler, repo: FakeRepo, name: str, head: bool) -> None:
        file = repo.files[name]
        if not head and self.delay:
            self.closing.wait(self.delay)
        body_size = file.size + (1024 if name in self.oversized and not head else 0)
        handler.send_response(200)
        handler.send_header("X-Repo-Commit", repo.commit)
        handler.send_header("ETag", f'"{file.blob_id}"')
        if repo.is_lfs(name):
            handler.send_header("X-Linked-Etag", f'"{file.sha256}"')
            handler.send_header("X-Linked-Size", str(file.size))
        handler.send_header("Content-Length", str(body_size))
        handler.end_headers()
        if head:
            return
        if name in self.stalls:
            handler.wfile.write(file.content[:16])
            handler.wfile.flush()
            while not self.closing.wait(0.1):
                pass
            return
        for chunk in file.chunks():
            handler.wfile.write(chunk)
        if body_size > file.size:
            handler.wfile.write(bytes(body_size - file.size))
