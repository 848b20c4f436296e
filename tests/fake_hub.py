"""A Hugging Face hub on 127.0.0.1 for the download tests: fixture repositories served as the real hub serves them.

What the hub clients (huggingface_hub 0.25 … 2.x: ``hf_hub_download``, ``snapshot_download``, ``model_info``,
``list_repo_files``) and ``lib_oms.download`` ask for:

- ``GET /api/models/{repo}[/revision/{rev}]`` (``?blobs=true``: sizes, git blob ids, LFS SHA-256);
- ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (``list_repo_tree``/``list_repo_files``);
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: small files are answered directly (``ETag`` = git blob id);
  LFS files (``.safetensors``) redirect to the "CDN" (``http://localhost:{port}/cdn/{sha256}``: another host name,
  as clients follow redirects within the hub's host only) with ``X-Linked-Etag`` (the SHA-256) and
  ``X-Linked-Size``; every hub answer carries ``X-Repo-Commit``;
- ``Range`` requests (206 with ``Content-Range``) on file contents;
- 404 with ``X-Error-Code`` ``RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound``.

Faults, each used once then gone: ``cut`` (send N bytes of a file's content, then drop the connection), ``corrupt``
(serve content whose last byte differs from the advertised hash) and ``busy`` (503). Every request is logged in
``requests`` and, when ``log_path`` is set, as a JSON line in that file (for a test in another process).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

POINTER_SIZE = 134  # bytes of a git-lfs pointer file


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = ""

    def __post_init__(self):
        digest = hashlib.sha1()
        for path in sorted(self.files):
            digest.update(path.encode() + b"\0" + hashlib.sha256(self.files[path]).digest())
        self.commit = digest.hexdigest()

    @staticmethod
    def is_lfs(path: str) -> bool:
        return path.endswith(".safetensors")

    def entry(self, path: str, blobs: bool) -> dict:
        data = self.files[path]
        if not blobs:
            return {"rfilename": path}
        entry = {"rfilename": path, "blobId": git_blob_id(data), "size": len(data)}
        if self.is_lfs(path):
            entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": POINTER_SIZE}
        return entry


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    user_agent: str = ""


def content_requests(requests: list[Request], path_end: str = "") -> list[Request]:
    """GETs of file contents (resolve of small files, CDN of LFS files) whose path ends with ``path_end``."""
    return [r for r in requests if r.method == "GET" and not r.path.startswith("/api/") and r.path.endswith(path_end)]


def read_request_log(path: Path) -> list[Request]:
    """The requests a FakeHub with ``log_path`` has written so far."""
    path = Path(path)
    if not path.is_file():
        return []
    return [Request(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    cut: dict[tuple[str, str], int] = field(default_factory=dict)  # (repo, path) -> bytes sent before the cut
    corrupt: set[tuple[str, str]] = field(default_factory=set)
    busy: set[tuple[str, str]] = field(default_factory=set)  # answer 503 (try again later) once
    url: str = ""
    cdn_url: str = ""  # the same server under another host name, as the real CDN is another host
    log_path: Path | None = None
    _log_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, repo_id: str, files: dict[str, bytes]) -> Repo:
        self.repos[repo_id] = Repo(dict(files))
        return self.repos[repo_id]

    def content_requests(self, path_end: str = "") -> list[Request]:
        return content_requests(self.requests, path_end)

    def record(self, request: Request) -> None:
        self.requests.append(request)
        if self.log_path is not None:
            with self._log_lock, open(self.log_path, "a") as log:
                log.write(json.dumps(asdict(request)) + "\n")

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.cdn_url = f"http://localhost:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


_MODEL_API = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?$")
_TREE_API = re.compile(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_CDN = re.compile(r"^/cdn/([0-9a-f]{64})$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub

    def log_message(self, *args) -> None:  # quiet: the tests read hub.requests instead
        pass

    def do_HEAD(self) -> None:
        self._route(body=False)

    def do_GET(self) -> None:
        self._route(body=True)

    # -- routing ---------------------------------------------------------------------------------------------

    def _route(self, body: bool) -> None:
        split = urlsplit(self.path)
        path, query = unquote(split.path), parse_qs(split.query)
        self.hub.record(Request(self.command, path, self.headers.get("Range"), self.headers.get("User-Agent", "")))
        if match := _MODEL_API.match(path):
            return self._model_info(match[1], match[2] or "main", query.get("blobs", [""])[0].lower() == "true", body)
        if match := _TREE_API.match(path):
            return self._tree(match[1], match[2], match[3] or "", body)
        if match := _RESOLVE.match(path):
            return self._resolve(match[1], match[2], match[3], body)
        if match := _CDN.match(path):
            return self._cdn(match[1], body)
        self._error(404, "RepoNotFound", "Not found", body)

    def _repo(self, repo_id: str, revision: str, body: bool) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found", body)
        elif revision not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
            repo = None
        return repo

    # -- answers ---------------------------------------------------------------------------------------------

    def _model_info(self, repo_id: str, revision: str, blobs: bool, body: bool) -> None:
        repo = self._repo(repo_id, revision, body)
        if repo is None:
            return
        info = {"_id": repo.commit[:24], "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
                "sha": repo.commit, "lastModified": "2024-01-02T03:04:05.000Z", "createdAt": "2024-01-02T03:04:05.000Z",
                "private": False, "disabled": False, "gated": False, "tags": [], "downloads": 0, "likes": 0,
                "siblings": [repo.entry(path, blobs) for path in sorted(repo.files)]}
        self._json(info, body)

    def _tree(self, repo_id: str, revision: str, folder: str, body: bool) -> None:
        repo = self._repo(repo_id, revision, body)
        if repo is None:
            return
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        entries, folders = [], set()
        for path in sorted(repo.files):
            if not path.startswith(prefix):
                continue
            parts = path.split("/")
            folders.update("/".join(parts[:i]) for i in range(1, len(parts)) if "/".join(parts[:i]).startswith(prefix))
            data = repo.files[path]
            entry = {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": path}
            if repo.is_lfs(path):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": POINTER_SIZE}
            entries.append(entry)
        directories = [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)]
        self._json(directories + entries, body)

    def _resolve(self, repo_id: str, revision: str, path: str, body: bool) -> None:
        repo = self._repo(repo_id, revision, body)
        if repo is None:
            return
        if path not in repo.files:
            self._error(404, "EntryNotFound", f"{path} does not exist", body, commit=repo.commit)
            return
        data = repo.files[path]
        if repo.is_lfs(path):
            sha = hashlib.sha256(data).hexdigest()
            self.send_response(302)
            self.send_header("Location", f"{self.hub.cdn_url}/cdn/{sha}")
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("X-Linked-Etag", f'"{sha}"')
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("ETag", f'"{sha}"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._content((repo_id, path), data, git_blob_id(data), body, commit=repo.commit)

    def _cdn(self, sha: str, body: bool) -> None:
        for repo_id, repo in self.hub.repos.items():
            for path, data in repo.files.items():
                if hashlib.sha256(data).hexdigest() == sha:
                    return self._content((repo_id, path), data, sha, body)
        self._error(404, "EntryNotFound", "no such object", body)

    def _content(self, key: tuple[str, str], data: bytes, etag: str, body: bool, commit: str | None = None) -> None:
        if body and key in self.hub.busy:
            self.hub.busy.discard(key)
            self._error(503, None, "Service unavailable, try again", body)
            return
        if body and key in self.hub.corrupt:
            self.hub.corrupt.discard(key)
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        begin, end, status = 0, len(data), 200
        if self.headers.get("Range"):
            match = _RANGE.match(self.headers["Range"].strip())
            if match is None or int(match[1]) >= len(data):
                self._error(416, None, "Requested range not satisfiable", body)
                return
            begin, end, status = int(match[1]), min(int(match[2] or len(data) - 1) + 1, len(data)), 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - begin))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{etag}"')
        if commit:
            self.send_header("X-Repo-Commit", commit)
        if status == 206:
            self.send_header("Content-Range", f"bytes {begin}-{end - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return
        cut = self.hub.cut.pop(key, None) if body else None
        if cut is not None:  # a connection lost mid-file: part of the bytes, then the socket closes
            self.wfile.write(data[begin:begin + cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(data[begin:end])

    def _json(self, value, body: bool) -> None:
        raw = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if body:
            self.wfile.write(raw)

    def _error(self, status: int, code: str | None, message: str, body: bool, commit: str | None = None) -> None:
        raw = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if body:
            self.wfile.write(raw)
