"""A real local HTTP server faking the Hugging Face Hub endpoints that huggingface_hub 2.x calls.

Serves repo info, the tree listing and `resolve` downloads (HEAD/GET, Range), logs every request and injects
faults (dropped connections, stalls, corrupted bodies, error statuses, throttling) for tests.
By hand: ``python3 -m tests.fake_hub --repo ORG/NAME=DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import select
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pdparams", ".pdiparams", ".onnx", ".gguf", ".pt", ".pth", ".msgpack", ".h5")
LFS_MIN_SIZE = 10 * 1024 * 1024
CHUNK = 64 * 1024


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob holding `data`."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class LoggedRequest:
    """One request as served; `path` is the decoded URL path without the query string."""

    method: str
    path: str
    range: str | None
    status: int


@dataclass(frozen=True)
class _File:
    data: bytes
    blob_id: str  # git blob sha1 of the content, or of the LFS pointer file for LFS files (as on the real Hub)
    sha256: str
    pointer_size: int | None  # None for files stored in git, not LFS

    @classmethod
    def build(cls, path: str, data: bytes) -> _File:
        sha256 = hashlib.sha256(data).hexdigest()
        if not path.endswith(LFS_SUFFIXES) and len(data) <= LFS_MIN_SIZE:
            return cls(data, git_blob_sha1(data), sha256, None)
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
        return cls(data, git_blob_sha1(pointer), sha256, len(pointer))


@dataclass
class _Repo:
    commits: dict[str, dict[str, _File]]
    branches: dict[str, str]  # branch -> commit; the first one added is the default branch
    token: str | None = None  # gated: every request needs `Authorization: Bearer <token>`


@dataclass
class _Fault:
    kind: str  # "fail", "drop", "stall" or "corrupt"
    times: int | None  # GETs left to affect; None = forever
    value: int  # status (fail), after_bytes (drop, stall) or offset (corrupt)
    sent: threading.Event | None = None  # stall: set once the partial body is out


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: FakeHub


class FakeHub:
    """Fake Hub on http://127.0.0.1:<port>, serving in a daemon thread until `close()`."""

    def __init__(self, port: int = 0) -> None:
        self.requests: list[LoggedRequest] = []
        self._repos: dict[str, _Repo] = {}
        self._faults: dict[tuple[str, str], list[_Fault]] = {}
        self._bytes_per_second: int | None = None
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._connections: set[socket.socket] = set()
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.hub = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-hub", daemon=True)
        self._thread.start()

    def add_repo(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        """Add a commit holding `files` to the repo, point `branch` at it and return its sha."""
        built = {path: _File.build(path, data) for path, data in files.items()}
        listing = sorted((path, f.sha256) for path, f in built.items())
        commit = hashlib.sha1(json.dumps(listing).encode()).hexdigest()
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo({}, {}))
            repo.commits[commit] = built
            repo.branches[branch] = commit
        return commit

    def add_directory(self, repo_id: str, directory: Path, branch: str = "main") -> str:
        """`add_repo` with every regular file under `directory` (symlinks followed)."""
        paths = sorted(p for p in directory.rglob("*") if p.is_file())
        files = {p.relative_to(directory).as_posix(): p.read_bytes() for p in paths}
        return self.add_repo(repo_id, files, branch)

    def add_listed_file(self, repo_id: str, path: str, data: bytes) -> None:
        """Put an arbitrary, possibly malicious path into every commit of the repo (commit shas unchanged)."""
        entry = _File.build(path, data)
        with self._lock:
            for files in self._repos[repo_id].commits.values():
                files[path] = entry

    def gate(self, repo_id: str, token: str) -> None:
        """Make the repo gated, as the Hub answers for one: 401 without a token, 403 GatedRepo with another."""
        with self._lock:
            self._repos[repo_id].token = token

    def drop_connection(self, repo_id: str, path: str, after_bytes: int, times: int = 1) -> None:
        """Next `times` GETs of the file: full headers, `after_bytes` of body, then the socket is closed."""
        self._add_fault(repo_id, path, _Fault("drop", times, after_bytes))

    def stall(self, repo_id: str, path: str, after_bytes: int) -> threading.Event:
        """Next GET of the file sends `after_bytes` of body, then hangs until the client goes away or `close()`."""
        sent = threading.Event()
        self._add_fault(repo_id, path, _Fault("stall", 1, after_bytes, sent))
        return sent

    def corrupt(self, repo_id: str, path: str, offset: int = 0, times: int | None = None) -> None:
        """GET bodies of the file get byte `offset` XOR 0xFF; HEAD and listings keep the true hashes."""
        self._add_fault(repo_id, path, _Fault("corrupt", times, offset))

    def fail(self, repo_id: str, path: str, status: int = 503, times: int = 2) -> None:
        """Next `times` GETs of the file (path "": of the repo's API, its info and listing) answer `status` with a
        small JSON body."""
        self._add_fault(repo_id, path, _Fault("fail", times, status))

    def throttle(self, bytes_per_second: int | None) -> None:
        """Slow every response body to about `bytes_per_second`; None = full speed."""
        self._bytes_per_second = bytes_per_second

    def reset(self) -> None:
        """Clear faults, throttle and the request log; repos stay."""
        with self._lock:
            self._faults.clear()
            self._bytes_per_second = None
            self.requests.clear()

    def close(self) -> None:
        """Stop serving and cut every open connection (stalled or keep-alive); safe to call twice."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        with self._lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)

    def _add_fault(self, repo_id: str, path: str, fault: _Fault) -> None:
        with self._lock:
            self._faults.setdefault((repo_id, path), []).append(fault)

    def _take_fault(self, repo_id: str, path: str, *kinds: str) -> _Fault | None:
        with self._lock:
            faults = self._faults.get((repo_id, path), [])
            for fault in faults:
                if fault.kind in kinds:
                    if fault.times is not None:
                        fault.times -= 1
                        if fault.times <= 0:
                            faults.remove(fault)
                    return fault
        return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.hub._lock:
            self.server.hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.server.hub._lock:
            self.server.hub._connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: object) -> None:
        """Silence the default stderr access log; `FakeHub.requests` has it."""

    def send_response(self, code: int, message: str | None = None) -> None:
        headers = getattr(self, "headers", None)
        entry = LoggedRequest(
            self.command or "", unquote(urlsplit(getattr(self, "path", "")).path),
            headers.get("Range") if headers else None, code,
        )
        with self.server.hub._lock:
            self.server.hub.requests.append(entry)
        super().send_response(code, message)

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        segments = [unquote(s) for s in url.path.split("/")[1:]]
        try:
            if self.command not in ("GET", "HEAD"):
                self.close_connection = True  # the request body, if any, is left unread
            elif segments[:2] == ["api", "models"]:
                return self._api(*_split_repo(segments[2:]), parse_qs(url.query))
            elif len(segments) >= 5 and _split_repo(segments)[1][:1] == ["resolve"]:
                return self._resolve(*_split_repo(segments))
            self._error(404, f"Not found: {url.path}")
        except OSError:  # the client went away
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch

    def _refused(self, repo_id: str, repo: _Repo) -> bool:
        """Answer 401/403 for a gated repo without the right token (True), as the Hub does."""
        if repo.token is None:
            return False
        given = self.headers.get("Authorization", "")
        if not given:
            self._error(401, f"Access to model {repo_id} is restricted. You must have access to it and be "
                             "authenticated to access it. Please log in.", "GatedRepo")
        elif given != f"Bearer {repo.token}":
            self._error(403, f"Access to model {repo_id} is restricted and you are not in the authorized list.",
                        "GatedRepo")
        return given != f"Bearer {repo.token}"

    def _api(self, repo_id: str, rest: list[str], query: dict[str, list[str]]) -> None:
        repo = self.server.hub._repos.get(repo_id)
        if repo is None:
            return self._error(404, f"Repository not found: {repo_id}", "RepoNotFound")
        if self._refused(repo_id, repo):
            return None
        if (failure := self.server.hub._take_fault(repo_id, "", "fail")) is not None:
            return self._error(failure.value, f"Injected failure ({failure.value})")
        if not rest or (rest[0] == "revision" and len(rest) == 2):
            revision = rest[1] if rest else next(iter(repo.branches))
            if (commit := self._commit(repo, revision)) is None:
                return None
            detailed = "blobs" in query or "expand" in query
            files = sorted(repo.commits[commit].items())
            siblings = [{"rfilename": path, **(_sibling_details(f) if detailed else {})} for path, f in files]
            return self._json(200, {"id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                                    "siblings": siblings})
        if rest[0] == "tree" and len(rest) >= 2:
            if (commit := self._commit(repo, rest[1])) is None:
                return None
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            entries = _tree(repo.commits[commit], commit, "/".join(rest[2:]), recursive)
            if entries is None:
                return self._error(404, f"Entry not found: {'/'.join(rest[2:])}", "EntryNotFound", commit)
            return self._json(200, entries)
        return self._error(404, f"Not found: {self.path}")

    def _resolve(self, repo_id: str, rest: list[str]) -> None:
        hub = self.server.hub
        repo = hub._repos.get(repo_id)
        if repo is None:
            return self._error(404, f"Repository not found: {repo_id}", "RepoNotFound")
        if self._refused(repo_id, repo):
            return None
        if (commit := self._commit(repo, rest[1])) is None:
            return None
        path = "/".join(rest[2:])
        f = repo.commits[commit].get(path)
        if f is None:
            return self._error(404, f"Entry not found: {path}", "EntryNotFound", commit)
        etag = f.blob_id if f.pointer_size is None else f.sha256
        headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if f.pointer_size is not None:
            headers |= {"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(len(f.data))}
        if self.command == "HEAD":
            return self._send_headers(200, headers, len(f.data))
        if (failure := hub._take_fault(repo_id, path, "fail")) is not None:
            return self._error(failure.value, f"Injected failure ({failure.value})")
        body = f.data
        if (corruption := hub._take_fault(repo_id, path, "corrupt")) is not None and corruption.value < len(body):
            body = bytearray(body)
            body[corruption.value] ^= 0xFF
        status, start, end = 200, 0, len(body)
        if (match := re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())) and any(match.groups()):
            first, last = match.groups()
            start = int(first) if first else max(len(body) - int(last), 0)
            end = min(int(last) + 1, len(body)) if first and last else len(body)
            if start >= end:
                return self._error(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{len(body)}"})
            status, headers["Content-Range"] = 206, f"bytes {start}-{end - 1}/{len(body)}"
        cut = hub._take_fault(repo_id, path, "drop", "stall")
        self._send_headers(status, headers, end - start)
        self._write(memoryview(body)[start:end if cut is None else min(end, start + cut.value)])
        if cut is None:
            return None
        self.close_connection = True
        if cut.sent is not None:
            cut.sent.set()
            while not hub._closing.wait(0.05) and not self._peer_closed():
                pass
        else:
            self.connection.shutdown(socket.SHUT_RDWR)
        return None

    def _commit(self, repo: _Repo, revision: str) -> str | None:
        """The commit for `revision`, or None after answering 404 RevisionNotFound."""
        commit = repo.branches.get(revision) or (revision if revision in repo.commits else None)
        if commit is None:
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _write(self, body: memoryview) -> None:
        pos = 0
        while pos < len(body):
            rate = self.server.hub._bytes_per_second
            step = CHUNK if rate is None else max(1, min(CHUNK, rate // 10))
            self.wfile.write(body[pos:pos + step])
            pos += step
            if rate:
                time.sleep(step / rate)

    def _peer_closed(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _send_headers(self, status: int, headers: dict[str, str], length: int) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _json(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self._send_headers(status, {"Content-Type": "application/json", **(headers or {})}, len(body))
        if self.command != "HEAD":
            self._write(memoryview(body))

    def _error(self, status: int, message: str, code: str | None = None, commit: str | None = None,
               headers: dict[str, str] | None = None) -> None:
        extra = dict(headers or {})
        if code:
            extra["X-Error-Code"] = code
        if commit:
            extra["X-Repo-Commit"] = commit
        self._json(status, {"error": message}, extra)


def _split_repo(segments: list[str]) -> tuple[str, list[str]]:
    """("org/name", rest) from URL path segments, dropping a leading "models" type prefix."""
    if segments[:1] == ["models"]:
        segments = segments[1:]
    return "/".join(segments[:2]), segments[2:]


def _sibling_details(f: _File) -> dict[str, object]:
    details: dict[str, object] = {"size": len(f.data), "blobId": f.blob_id}
    if f.pointer_size is not None:
        details["lfs"] = {"sha256": f.sha256, "size": len(f.data), "pointerSize": f.pointer_size}
    return details


def _tree(files: dict[str, _File], commit: str, path: str, recursive: bool) -> list[dict[str, object]] | None:
    """Tree entries under `path` (directories included), or None if nothing lives there."""
    prefix = f"{path}/" if path else ""
    directories = {"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)} - {""}

    def listed(p: str) -> bool:
        return p.startswith(prefix) and (recursive or "/" not in p[len(prefix):])

    entries: list[dict[str, object]] = [
        {"type": "directory", "oid": hashlib.sha1(f"tree {commit} {d}".encode()).hexdigest(), "size": 0, "path": d}
        for d in directories if listed(d)
    ]
    for p, f in files.items():
        if listed(p):
            entry: dict[str, object] = {"type": "file", "oid": f.blob_id, "size": len(f.data), "path": p}
            if f.pointer_size is not None:
                entry["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": f.pointer_size}
            entries.append(entry)
    if path and not entries:
        return None
    return sorted(entries, key=lambda e: str(e["path"]))


def user_env(hub: FakeHub, root: Path) -> dict[str, str]:
    """A user's environment for a test: caches of its own under `root` (HF_HOME, VLHUB_HOME), `hub` as HF_ENDPOINT,
    no telemetry, no Xet (the fake hub serves plain HTTP)."""
    hub.reset()
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(root / "hf"), "VLHUB_HOME": str(root / "vlhub"),
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}


def main(argv: list[str] | None = None) -> None:
    """Serve directories as Hub repos until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python3 -m tests.fake_hub", description="Serve DIRs as fake Hub repos.")
    parser.add_argument("--port", type=int, default=8088)
    parser.add_argument("--repo", action="append", default=[], metavar="ORG/NAME=DIR", help="serve DIR as a repo")
    args = parser.parse_args(argv)
    if not args.repo:
        parser.error("pass at least one --repo ORG/NAME=DIR")
    specs = [spec.partition("=") for spec in args.repo]
    for repo_id, sep, directory in specs:
        if not sep or repo_id.count("/") != 1 or not Path(directory).is_dir():
            parser.error(f"bad --repo {repo_id}{sep}{directory}: expected ORG/NAME=DIR with an existing DIR")
    with contextlib.closing(FakeHub(port=args.port)) as hub:
        for repo_id, _, directory in specs:
            print(f"{repo_id} @ {hub.add_directory(repo_id, Path(directory))} <- {directory}")
        print(f"Serving {hub.url}; try: HF_ENDPOINT={hub.url} HF_HUB_DISABLE_XET=1 hf download {specs[0][0]}")
        print("Ctrl-C to stop.", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
