"""Locks between vlhub processes that share a cache.

`flock(2)` locks belong to an open file, so the kernel releases them when their process dies however it
dies (SIGKILL, OOM killer, power cut of a client on NFS): a lock file left behind by a dead process is
free to take at once, and nobody waits on it. The holder's pid is written into the file only so that a
waiting process can say whom it waits for.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from vlhub.hub.home import safe_name, vlhub_home


def lock_path(*parts: str) -> Path:
    """A lock file under $VLHUB_HOME/locks named after `parts` (repo ids, revisions: any characters)."""
    name = "--".join(safe_name(part) for part in parts)
    return vlhub_home() / "locks" / f"{name}.lock"


@contextmanager
def exclusive_lock(path: Path, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold `path` exclusively for the block; if another process holds it, call `on_wait(holder)` and
    wait until it finishes or dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait(os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def lock_open_file(fd: int) -> None:
    """Wait for exclusive use of an open file (a partial download two revisions' downloads could share)."""
    fcntl.flock(fd, fcntl.LOCK_EX)
