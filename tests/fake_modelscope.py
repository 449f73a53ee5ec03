"""A fake ModelScope hub: the legacy ``/api/v1`` endpoints the ``modelscope`` client uses to list and download files.

Served from memory on 127.0.0.1 in a daemon thread. Point the client at ``FakeModelScope.url`` with
``endpoint=`` (or ``MODELSCOPE_ENDPOINT`` set before the first ``HubApi()`` of a process).

Endpoints (``{repo}`` is ``owner/name``):

- ``GET /api/v1/models/{repo}/revisions`` -> ``Data.RevisionMap.Branches[].Revision``
- ``GET /api/v1/models/{repo}/repo/files?Revision=&Recursive=[&Root=]`` -> ``Data.Files[]`` with
  ``Path``, ``Name``, ``Type`` (``blob``/``tree``), ``Size``, ``Sha256``
- ``GET /api/v1/models/{repo}/repo?Revision=&FilePath=`` -> file bytes, ``Range: bytes=N-[M]`` answered with 206

Everything else (e.g. the client's ``/api/v1/repos/internalAccelerationInfo`` probe) gets a JSON 404.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

_ROUTE = re.compile(r"^/api/v1/models/(?P<repo>[^/]+/[^/]+)(?P<rest>/revisions|/repo/files|/repo)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class FakeModelScope:
    """In-memory ModelScope hub; ``requests`` logs every ``(method, path with query)`` received."""

    url: str
    requests: list[tuple[str, str]]

    def __init__(self) -> None:
        self.requests = []
        self._repos: dict[tuple[str, str], dict[str, bytes]] = {}
        self._corrupt: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def add_repo(self, repo_id: str, files: dict[str, bytes], revision: str = "master") -> None:
        """Serve ``files`` (repo-relative POSIX path -> content) as ``repo_id`` at ``revision``."""
        with self._lock:
            self._repos[(repo_id, revision)] = dict(files)

    def add_directory(self, repo_id: str, directory: Path, revision: str = "master") -> None:
        """Serve every file under ``directory`` as ``repo_id`` at ``revision``."""
        files = {
            p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
        }
        self.add_repo(repo_id, files, revision)

    def corrupt(self, repo_id: str, path: str, offset: int = 0) -> None:
        """Serve ``path`` (every revision) with the byte at ``offset`` flipped; the listing keeps the true Sha256."""
        with self._lock:
            self._corrupt[(repo_id, path)] = offset

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _files(self, repo_id: str, revision: str) -> dict[str, bytes] | None:
        with self._lock:
            return self._repos.get((repo_id, revision))

    def _revisions(self, repo_id: str) -> list[str]:
        with self._lock:
            return sorted(rev for repo, rev in self._repos if repo == repo_id)

    def _served(self, repo_id: str, path: str, data: bytes) -> bytes:
        with self._lock:
            offset = self._corrupt.get((repo_id, path))
        if offset is None or not data:
            return data
        flipped = bytearray(data)
        flipped[offset] ^= 0xFF
        return bytes(flipped)


def _listing(files: dict[str, bytes], root: str, recursive: bool) -> list[dict[str, Any]]:
    """``repo/files`` entries under ``root``: blobs plus one ``tree`` entry per directory, like the real hub."""
    prefix = f"{root}/" if root else ""
    entries: dict[str, dict[str, Any]] = {}
    for path, data in sorted(files.items()):
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix) :].split("/")
        depth = len(parts) - 1 if recursive else min(1, len(parts) - 1)
        for i in range(1, depth + 1):
            tree = prefix + "/".join(parts[:i])
            entries.setdefault(tree, {"Name": parts[i - 1], "Path": tree, "Type": "tree", "Size": 0, "Sha256": ""})
        if recursive or len(parts) == 1:
            sha = hashlib.sha256(data).hexdigest()
            entries[path] = {"Name": parts[-1], "Path": path, "Type": "blob", "Size": len(data), "Sha256": sha}
    return list(entries.values())


class _Handler(BaseHTTPRequestHandler):
    hub: FakeModelScope
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""

    def do_GET(self) -> None:
        self.hub.requests.append(("GET", self.path))
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        match = _ROUTE.match(url.path)
        if match is None:
            return self._json(404, {"Code": 404, "Success": False, "Message": f"no route for {url.path}"})
        repo, rest = match["repo"], match["rest"]
        if rest == "/revisions":
            if not (revisions := self.hub._revisions(repo)):
                return self._json(404, {"Code": 404, "Success": False, "Message": f"model {repo} not found"})
            revision_map = {"Branches": [{"Revision": r, "CreatedAt": int(time.time())} for r in revisions], "Tags": []}
            return self._json(200, {"Code": 200, "Success": True, "Data": {"RevisionMap": revision_map}})
        revision = query.get("Revision", "master")
        files = self.hub._files(repo, revision)
        if files is None:
            return self._json(404, {"Code": 404, "Success": False, "Message": f"{repo}@{revision} not found"})
        if rest == "/repo/files":
            root = query.get("Root", "").strip("/")
            entries = _listing(files, root, query.get("Recursive", "False").lower() == "true")
            return self._json(200, {"Code": 200, "Success": True, "Data": {"Files": entries}})
        path = query.get("FilePath", "")
        if path not in files:
            return self._json(404, {"Code": 404, "Success": False, "Message": f"{path} not in {repo}@{revision}"})
        self._file(self.hub._served(repo, path, files[path]))

    def _file(self, data: bytes) -> None:
        """Send ``data``, or the part a ``Range: bytes=N-[M]`` header asks for."""
        start, end, status = 0, len(data) - 1, 200
        if ranged := _RANGE.match(self.headers.get("Range", "")):
            start = int(ranged[1])
            end = min(int(ranged[2]), end) if ranged[2] else end
            if start > end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start : end + 1]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
