"""A small stand-in for the Hugging Face Hub, served on 127.0.0.1, for the real ``huggingface_hub`` client.

It serves model repos from local folders with the endpoints ``snapshot_download`` / ``hf_hub_download`` use:

- ``GET  /api/models/{repo}/revision/{rev}``  repo info with the commit sha and the file list;
- ``GET  /api/models/{repo}/tree/{rev}``      the recursive tree (``.safetensors`` files as LFS entries);
- ``HEAD /{repo}/resolve/{rev}/{path}``       metadata headers (``X-Repo-Commit``, ``ETag``, ``X-Linked-*``);
- ``GET  /{repo}/resolve/{rev}/{path}``       the file, honouring ``Range: bytes=N-`` with ``206``.

Unknown repos, revisions and files answer 404 with the ``X-Error-Code`` the client maps to its errors.
``drop_once`` makes the first full GET of a file send only part of the body and close the connection, as a
dropped connection would; every request is logged in ``requests`` for assertions.
Point the client at it with ``HF_ENDPOINT=server.url`` (a subprocess) or ``huggingface_hub.constants.ENDPOINT``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class HubStub:
    def __init__(self, repos: dict[str, Path], drop_once: dict[str, float] | None = None):
        self.repos = {r: Path(p) for r, p in repos.items()}
        self.drop_once = dict(drop_once or {})
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "HubStub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- repo contents -------------------------------------------------------------------------------------------

    def files(self, repo: str) -> dict[str, Path]:
        root = self.repos[repo]
        return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}

    def commit(self, repo: str) -> str:
        h = hashlib.sha1(repo.encode())
        for name, p in self.files(repo).items():
            h.update(name.encode())
            h.update(str(p.stat().st_size).encode())
        return h.hexdigest()

    @staticmethod
    def sha256(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    def fetched(self, method: str = "GET") -> list[str]:
        """File paths requested with ``method`` on the resolve endpoint."""
        out = []
        for m, path, _ in self.requests:
            match = re.match(r"^/[^/]+/[^/]+/resolve/[^/]+/(.+)$", path)
            if m == method and match:
                out.append(unquote(match[1]))
        return out

    # -- HTTP ----------------------------------------------------------------------------------------------------

    def _handler(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: bytes = b"", headers: dict | None = None) -> None:
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, str(v))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, data) -> None:
                self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json"})

            def _error(self, code: str, message: str) -> None:
                self._send(404, json.dumps({"error": message}).encode(),
                           {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"})

            def _repo(self, repo: str, rev: str) -> bool:
                if repo not in stub.repos:
                    self._error("RepoNotFound", f"Repository {repo} not found")
                    return False
                if rev not in ("main", stub.commit(repo)):
                    self._error("RevisionNotFound", f"Revision {rev} not found")
                    return False
                return True

            def do_HEAD(self):
                self.do_GET()

            def do_GET(self):
                path = urlparse(self.path).path
                with stub._lock:
                    stub.requests.append((self.command, path, self.headers.get("Range")))
                m = re.match(r"^/api/models/([^/]+/[^/]+)/revision/([^/]+)$", path)
                if m:
                    repo, rev = m[1], unquote(m[2])
                    if self._repo(repo, rev):
                        self._json({"id": repo, "modelId": repo, "sha": stub.commit(repo), "private": False,
                                    "siblings": [{"rfilename": f} for f in stub.files(repo)]})
                    return
                m = re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?$", path)
                if m:
                    repo, rev = m[1], unquote(m[2])
                    if self._repo(repo, rev):
                        entries = []
                        for name, p in stub.files(repo).items():
                            size = p.stat().st_size
                            entry = {"type": "file", "path": name, "size": size,
                                     "oid": hashlib.sha1(p.read_bytes()).hexdigest()}
                            if name.endswith((".safetensors", ".pth", ".bin")):
                                entry["lfs"] = {"oid": stub.sha256(p), "size": size, "pointerSize": 134}
                            entries.append(entry)
                        self._json(entries)
                    return
                m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
                if m:
                    repo, rev, name = m[1], unquote(m[2]), unquote(m[3])
                    if not self._repo(repo, rev):
                        return
                    files = stub.files(repo)
                    if name not in files:
                        self._error("EntryNotFound", f"{name} not found in {repo}")
                        return
                    self._file(repo, name, files[name])
                    return
                self._error("NotFound", f"no route for {path}")

            def _file(self, repo: str, name: str, p: Path) -> None:
                data = p.read_bytes()
                size = len(data)
                lfs = name.endswith((".safetensors", ".pth", ".bin"))
                etag = stub.sha256(p) if lfs else hashlib.sha1(data).hexdigest()
                headers = {"X-Repo-Commit": stub.commit(repo), "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                           "Content-Type": "application/octet-stream"}
                if lfs:
                    headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": size})
                if self.command == "HEAD":
                    self.send_response(200)
                    for k, v in headers.items():
                        self.send_header(k, str(v))
                    self.send_header("Content-Length", str(size))
                    self.end_headers()
                    return
                rng = self.headers.get("Range")
                start = 0
                if rng:
                    m = re.match(r"bytes=(\d+)-$", rng.strip())
                    if not m or int(m[1]) >= size:
                        self._send(416, b"", {"Content-Range": f"bytes */{size}"})
                        return
                    start = int(m[1])
                    headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
                body = data[start:]
                with stub._lock:
                    fraction = stub.drop_once.pop(name, None) if not rng else None
                self.send_response(206 if rng else 200)
                for k, v in headers.items():
                    self.send_header(k, str(v))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if fraction is not None:  # a dropped connection: part of the body, then the socket closes
                    self.wfile.write(body[: int(len(body) * fraction)])
                    self.wfile.flush()
                    self.close_connection = True
                    try:
                        self.connection.shutdown(2)
                    except OSError:
                        pass
                    return
                self.wfile.write(body)

        return Handler
