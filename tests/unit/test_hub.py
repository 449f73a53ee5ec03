"""The download machinery on its own: a lock its dead holder left, the hash following a restarted transfer, what a
dropped connection keeps, a listing's hashes as untrusted names, FILENAMES as `hf download` reads them, and which
network errors mean the hub cannot be reached (downloads through the command: tests/cli/test_download.py,
tests/cli/test_network.py)."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from vlhub.hub.transfer import BUFFER_BYTES, BUFFERS, CANCEL_EVERY, Cancelled, LongBody, append_hashed, receive
from vlhub.owned import exclusive_lock


def test_a_lock_held_by_a_dead_process_is_taken_at_once(tmp_path: Path) -> None:
    lock = tmp_path / "model.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from vlhub.owned import exclusive_lock\n"
        f"with exclusive_lock(Path({str(lock)!r})):\n    print('held', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    waits: list[str] = []
    holder.kill()
    holder.wait()
    assert f"pid {holder.pid}" in lock.read_text()  # the dead holder's note is still there
    started = time.monotonic()
    with exclusive_lock(lock, on_wait=waits.append):
        pass
    assert not waits and time.monotonic() - started < 1


@contextlib.contextmanager
def serving_whole(content: bytes) -> Iterator[str]:
    """A local server answering every GET with all of `content` (200, ignoring Range); its URL."""

    class WholeFile(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), WholeFile)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/f"
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_that_ignores_range_restarts_the_file_and_its_hash(tmp_path: Path) -> None:
    """Asked for the rest of a file, a server may send all of it (200): the partial file and the hash start over."""
    content = b"fresh content" * 1000
    path = tmp_path / "part"
    path.write_bytes(b"stale-prefix")
    with serving_whole(content) as url, open(path, "r+b") as handle:
        digest = receive(url, handle.fileno(), 12, len(content), hashlib.sha256, hashlib.sha256(b"stale-prefix"),
                         None, threading.Event())
    assert digest.hexdigest() == hashlib.sha256(content).hexdigest()
    assert path.read_bytes() == content


def test_what_arrived_before_a_dropped_connection_is_kept_and_a_write_error_wins(tmp_path: Path) -> None:
    def dropped() -> Iterator[bytes]:
        yield b"a" * (BUFFER_BYTES + 10)  # one whole buffer and a part of the next
        raise ConnectionResetError("dropped")

    digest = hashlib.sha256()
    with open(tmp_path / "part", "wb") as handle, pytest.raises(ConnectionResetError):
        append_hashed(dropped(), handle.fileno(), digest, None, threading.Event())
    assert (tmp_path / "part").read_bytes() == b"a" * (BUFFER_BYTES + 10)
    assert digest.hexdigest() == hashlib.sha256(b"a" * (BUFFER_BYTES + 10)).hexdigest()

    with open(tmp_path / "part", "rb") as read_only, pytest.raises(OSError) as failed:  # as a full disk would
        append_hashed(iter([b"b" * BUFFER_BYTES] * 3), read_only.fileno(), hashlib.sha256(), None,
                      threading.Event())
    assert failed.value.errno is not None


def test_a_body_longer_than_the_listing_is_refused_at_once(tmp_path: Path) -> None:
    """More bytes than the hub lists is not a dropped connection: one error naming both sizes, not five retries."""
    with (serving_whole(b"x" * 1500) as url, open(tmp_path / "part", "wb") as handle,
          pytest.raises(LongBody, match="1500 bytes where the hub lists 1000")):
        receive(url, handle.fileno(), 0, 1000, hashlib.sha256, hashlib.sha256(), None, threading.Event())


def test_a_failing_hash_ends_the_transfer_with_its_error() -> None:
    """The hashing thread's error reaches the caller, and every buffer comes back (no wait for a free one)."""

    class BrokenDigest:
        def update(self, data: object) -> None:
            raise MemoryError("hash")

    done: list[BaseException] = []

    def run() -> None:
        try:
            append_hashed(iter([b"d" * BUFFER_BYTES] * (4 * BUFFERS)), -1, BrokenDigest(), None, threading.Event())
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            done.append(exc)

    transfer = threading.Thread(target=run, daemon=True)
    transfer.start()
    transfer.join(timeout=60)
    assert not transfer.is_alive(), "the transfer waited forever for a buffer"
    assert len(done) == 1 and isinstance(done[0], MemoryError)


def test_a_cancelled_transfer_stops_at_the_next_stride_and_keeps_what_it_wrote(tmp_path: Path) -> None:
    cancel = threading.Event()
    cancel.set()  # another transfer failed: this one stops after CANCEL_EVERY bytes, all of them on disk
    with open(tmp_path / "part", "wb") as handle, pytest.raises(Cancelled):
        append_hashed(iter([b"c" * BUFFER_BYTES] * (CANCEL_EVERY // BUFFER_BYTES + 3)), handle.fileno(),
                      hashlib.sha256(), None, cancel)
    assert (tmp_path / "part").stat().st_size == CANCEL_EVERY


def test_listed_hashes_are_untrusted_names_too() -> None:
    from vlhub.errors import UserError
    from vlhub.hub.download import DownloadOptions, checked_files, resolve_repo
    from vlhub.hub.records import RemoteFile

    ref = resolve_repo("org/repo")
    for sha256, blob_id in (("../../../../victim.txt", None), (None, "../victim"), (None, None), ("A" * 64, None)):
        with pytest.raises(UserError, match="no valid hash"):
            checked_files([RemoteFile("w.safetensors", 5, sha256, blob_id)], ref, DownloadOptions())


def _connect_error(to: tuple[str, int], **kwargs: object) -> BaseException:
    """The exception huggingface_hub's own HTTP client raises connecting to `to`."""
    from huggingface_hub.utils import get_session

    try:
        get_session().get(f"{kwargs.get('scheme', 'http')}://{to[0]}:{to[1]}/api/models/a/b", timeout=5)
    except Exception as exc:  # noqa: BLE001 - the point is which one
        return exc
    raise AssertionError("connected")


def test_which_network_errors_mean_the_hub_cannot_be_reached() -> None:
    """Judged on the exceptions the real client raises: a name that does not resolve, a closed port and a TLS
    handshake with a plain-HTTP server are unreachable (not retried); a dropped connection is not."""
    import socket

    from vlhub.hub.download import unreachable_reason

    assert "does not resolve" in unreachable_reason(_connect_error(("nonexistent.invalid", 80)))
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert unreachable_reason(_connect_error(("127.0.0.1", port))) == "the connection was refused"
    with serving_whole(b"x" * 10) as url:
        host, port_text = url.removeprefix("http://").split("/")[0].split(":")
        assert "TLS" in unreachable_reason(_connect_error((host, int(port_text)), scheme="https"))
    dropped = ConnectionResetError(104, "Connection reset by peer")
    assert unreachable_reason(dropped) is None
    assert unreachable_reason(RuntimeError("503 Server Error")) is None


def test_the_unreachable_line_sends_to_a_mirror_only_when_none_is_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    from vlhub.hub.download import unreachable
    from vlhub.hub.records import RepoRef

    for variable in ("HF_ENDPOINT", "MODELSCOPE_ENDPOINT", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(variable, raising=False)
    hf = RepoRef("huggingface", "Qwen/Qwen2-VL-2B-Instruct", "main", "qwen2-vl-2b")
    default = str(unreachable("https://huggingface.co", "it did not answer", hf))
    assert "the hub https://huggingface.co is unreachable" in default and "set HF_ENDPOINT to a mirror" in default
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.com/")
    mirror = str(unreachable("https://hf-mirror.com", "it did not answer", hf))
    assert mirror.startswith("the configured endpoint https://hf-mirror.com (HF_ENDPOINT) is unreachable"), mirror
    assert "set HF_ENDPOINT to a mirror" not in mirror
    assert all(other in mirror for other in ("--source modelscope", "local checkpoint directory", "HF_HUB_OFFLINE=1"))
    ms = RepoRef("modelscope", "Qwen/Qwen2-VL-2B-Instruct", "master", "qwen2-vl-2b")
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://ms.invalid")
    line = str(unreachable("http://ms.invalid", "it did not answer", ms))
    assert "(MODELSCOPE_ENDPOINT) is unreachable" in line and "to a reachable mirror" not in line, line
    assert "--source huggingface" in line


def test_filenames_are_read_as_hf_download_reads_them() -> None:
    from vlhub.errors import UserError
    from vlhub.hub.download import DownloadOptions, checked_files, resolve_repo
    from vlhub.hub.records import RemoteFile

    files = [RemoteFile(name, 1, None, "0" * 40) for name in ("config.json", "a.safetensors", "art/x.png", "art/y.png")]
    ref = resolve_repo("org/repo")
    chosen = checked_files(files, ref, DownloadOptions(filenames=("config.json", "art/")))
    assert [f.path for f in chosen] == ["config.json", "art/x.png", "art/y.png"]
    # FILENAMES replace --include/--exclude, as in `hf download`
    assert DownloadOptions(include=("*.json",), filenames=("a.safetensors",)).patterns == (["a.safetensors"], None)
    with pytest.raises(UserError, match="has no file 'nope.json'"):
        checked_files(files, ref, DownloadOptions(filenames=("nope.json",)))


def test_a_download_record_reads_back_typed_and_keeps_its_json_form(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from vlhub.hub.records import RecordedFile, RemoteFile, load_record, record_path, save_record

    monkeypatch.setenv("VLHUB_HOME", str(tmp_path))
    written = {"source": "huggingface", "repo_id": "Org/Name", "model": "Org/Name", "revision": "main",
               "commit": "c" * 40, "path": "/x/snapshots/" + "c" * 40, "endpoint": "https://huggingface.co",
               "files": {"config.json": {"size": 2, "sha256": None, "blob_id": "b" * 40, "verified_at": "2026-12-07"},
                         "w.safetensors": {"size": 9, "sha256": "a" * 64, "blob_id": None, "verified_at": ""}},
               "damaged": [], "filtered": False}
    path = record_path("huggingface", "Org/Name", "c" * 40)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(written))  # as records were written before RecordedFile
    record = load_record("huggingface", "Org/Name", "c" * 40)
    assert record is not None and record.files["config.json"] == RecordedFile(2, None, "b" * 40, "2026-12-07")
    assert record.verified(RemoteFile("config.json", 2, None, "b" * 40))
    assert not record.verified(RemoteFile("w.safetensors", 9, "a" * 64, None)) and record.total_bytes == 11
    save_record(record)
    assert json.loads(path.read_text()) == written
    path.write_text(json.dumps({**written, "files": {"config.json": ["not", "an", "entry"]}}))
    assert load_record("huggingface", "Org/Name", "c" * 40) is None  # a record from elsewhere is ignored


def test_a_proxy_named_without_its_scheme_is_an_http_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """`http_proxy=127.0.0.1:3128` is a common spelling that httpx and requests read as http://127.0.0.1:3128;
    the probe once took it for a proxy with no host and failed every ModelScope download behind it."""
    from vlhub.hub.download import proxy_for

    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY", "all_proxy",
                 "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("https_proxy", "127.0.0.1:3128")
    assert proxy_for("https://modelscope.cn") == ("http://127.0.0.1:3128", "HTTPS_PROXY")
    monkeypatch.setenv("https_proxy", "socks5://127.0.0.1:1080")
    assert proxy_for("https://modelscope.cn") == ("socks5://127.0.0.1:1080", "HTTPS_PROXY")
