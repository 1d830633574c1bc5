"""A local stand-in for the Hugging Face hub: a real HTTP server on loopback.

It serves the two endpoints huggingface_hub calls for ``model_info(..., files_metadata=True)`` and
``hf_hub_download`` (read from huggingface_hub's hf_api.py / file_download.py):

- ``GET /api/models/{repo}[/revision/{rev}]?blobs=True`` -> ``{"id", "sha", "siblings": [{"rfilename",
  "size", "blobId", "lfs": {"sha256", "size", "pointerSize"}}]}``
- ``HEAD`` / ``GET /{repo}/resolve/{rev}/{file}`` with ``X-Repo-Commit``, ``ETag`` (LFS files also
  ``X-Linked-Etag`` = the SHA-256 and ``X-Linked-Size``) and ``Content-Length``; errors carry
  ``X-Error-Code`` (RepoNotFound / RevisionNotFound / EntryNotFound) as the real hub does.

Every request is recorded (method, path, headers) so tests can assert what was and was not fetched.
A repo can serve a tampered file: bytes that differ from the SHA-256 it publishes.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".ckpt")


@dataclass
class Repo:
    commit: str
    files: dict[str, bytes]  # what the repo really holds (what its published hashes describe)
    served: dict[str, bytes] = field(default_factory=dict)  # overrides: bytes actually sent


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):  # keep test output clean
                pass

            def do_GET(self):
                hub._handle(self, head=False)

            def do_HEAD(self):
                hub._handle(self, head=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # -- setup ---------------------------------------------------------------------------------------------
    def add_folder(self, repo_id: str, folder: Path, *, extra: dict[str, bytes] | None = None,
                   tamper: dict[str, bytes] | None = None) -> Repo:
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
                 if p.is_file()}
        files.update(extra or {})
        commit = hashlib.sha1(repo_id.encode() + b"".join(files[n] for n in sorted(files))).hexdigest()
        repo = Repo(commit=commit, files=files, served=dict(tamper or {}))
        self.repos[repo_id] = repo
        return repo

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def resolved(self) -> list[str]:
        """File names fetched or probed through /resolve/ (HEAD or GET)."""
        with self._lock:
            return [r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in self.requests
                    if "/resolve/" in r.path]

    # -- serving -------------------------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler, *, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        with self._lock:
            self.requests.append(Request(h.command, path, {k.lower(): v for k, v in h.headers.items()}))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            repo = self._repo(h, m.group(1), m.group(2) or "main")
            if repo is not None:
                self._send(h, 200, json.dumps(self._info(m.group(1), repo)).encode(),
                           {"Content-Type": "application/json"}, head=head)
            return
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            repo = self._repo(h, m.group(1), m.group(2))
            if repo is None:
                return
            name = m.group(3)
            if name not in repo.files:
                self._send(h, 404, b"Entry not found", {"X-Error-Code": "EntryNotFound",
                                                        "X-Repo-Commit": repo.commit}, head=head)
                return
            real = repo.files[name]
            body = repo.served.get(name, real)
            headers = {"X-Repo-Commit": repo.commit, "Content-Type": "application/octet-stream"}
            if name.endswith(LFS_SUFFIXES):
                sha = hashlib.sha256(real).hexdigest()
                headers.update({"ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"',
                                "X-Linked-Size": str(len(real))})
            else:
                headers["ETag"] = f'"{_git_blob_id(real)}"'
            self._send(h, 200, body, headers, head=head)
            return
        self._send(h, 404, b"not found", {}, head=head)

    def _repo(self, h: BaseHTTPRequestHandler, repo_id: str, rev: str) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._send(h, 404, b'{"error":"Repository not found"}', {"X-Error-Code": "RepoNotFound"},
                       head=h.command == "HEAD")
            return None
        if rev not in ("main", repo.commit):
            self._send(h, 404, b'{"error":"Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"},
                       head=h.command == "HEAD")
            return None
        return repo

    @staticmethod
    def _info(repo_id: str, repo: Repo) -> dict:
        siblings = []
        for name, data in sorted(repo.files.items()):
            s: dict = {"rfilename": name, "size": len(data), "blobId": _git_blob_id(data)}
            if name.endswith(LFS_SUFFIXES):
                s["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            siblings.append(s)
        return {"id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False, "siblings": siblings}

    @staticmethod
    def _send(
        h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str], *, head: bool
    ) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()
