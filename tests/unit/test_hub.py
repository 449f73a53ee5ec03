"""The download machinery on its own: a lock its dead holder left, the hash following a restarted transfer, and a
listing's hashes as untrusted names (downloads through the command: tests/cli/test_download.py)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlhub.hub.download import HashingWriter
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


def test_hashing_writer_follows_a_restart_from_zero(tmp_path: Path) -> None:
    """When a server ignores Range, the client seeks back and truncates: the hash must restart with the file."""
    path = tmp_path / "part"
    path.write_bytes(b"stale-prefix")
    with open(path, "r+b") as handle:
        writer = HashingWriter(handle, hashlib.sha256, None)
        writer.write(b"more")
        writer.seek(0)
        writer.truncate()
        writer.write(b"fresh content")
    assert writer.digest.hexdigest() == hashlib.sha256(b"fresh content").hexdigest()
    assert path.read_bytes() == b"fresh content"


def test_listed_hashes_are_untrusted_names_too() -> None:
    from vlhub.errors import UserError
    from vlhub.hub.download import checked_files, resolve_repo
    from vlhub.hub.records import RemoteFile

    ref = resolve_repo("org/repo")
    for sha256, blob_id in (("../../../../victim.txt", None), (None, "../victim"), (None, None), ("A" * 64, None)):
        with pytest.raises(UserError, match="no valid hash"):
            checked_files([RemoteFile("w.safetensors", 5, sha256, blob_id)], ref, None, None)
