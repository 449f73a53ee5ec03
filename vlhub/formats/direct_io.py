"""Large sequential reads and writes around the page cache (O_DIRECT), where the filesystem allows it.

A conversion reads every source byte once and writes every output byte once; nothing reads them again soon.
Through the page cache each byte is also copied by the kernel, and its pages allocated, filled and later
reclaimed: on this project's machines that was most of a copy's CPU (`cp` of a 3.9 GB shard: 14.0 s of system
time in 15.8 s; `dd iflag=direct oflag=direct` of the same file: 0.3 s in 5.7 s), and a conversion is CPU-bound.
With O_DIRECT the device moves the bytes straight to and from this process's buffers; what is left is one copy
in user space, out of an aligned read buffer or into an aligned staging buffer.

Direct I/O wants buffers, offsets and lengths aligned to the device's blocks (4096 bytes covers every device
with blocks up to 4 KiB): reads round their range out to whole blocks and copy the wanted bytes; writes are
staged in aligned buffers, and a file's last partial block is written after O_DIRECT is turned off for it.
Where a filesystem refuses O_DIRECT (some network and FUSE filesystems, tmpfs on older kernels), or refuses
one of its reads or writes, the same calls read and write through the page cache.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from vlhub.errors import CorruptCheckpoint

ALIGN = 4096
# one read or write of the device at a time is this large: 16 MiB ran at the device's speed here (1.3 GB/s read,
# 1.5 GB/s write with `dd`), and a staging buffer of it costs little memory
CHUNK = 16 << 20
# what a filesystem says when it takes no O_DIRECT, or not for this request
_REFUSED = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP})
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_buffers = threading.local()  # each reading thread's aligned read buffer, reused for every read


def mapped_buffer(nbytes: int) -> np.ndarray:
    """A uint8 array of `nbytes` in memory mapped for it alone: page-aligned (so aligned for direct I/O), and
    returned to the kernel when the array goes. glibc would keep a freed buffer of up to 32 MiB in the heap of
    the thread that freed it: buffers freed by a conversion's threads raised a 7B's peak from 518 MB to 705 MB."""
    if not nbytes:
        return np.empty(0, np.uint8)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # as numpy asks for its large arrays: a 2 MiB page faults in at once
        with contextlib.suppress(OSError):  # a kernel built without huge pages refuses (as numpy, go on without)
            region.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(region, np.uint8)


def set_direct(fd: int, direct: bool) -> bool:
    """Turn O_DIRECT on or off for an open file; False if the filesystem refuses it (nothing changed)."""
    if not _O_DIRECT:
        return False
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | _O_DIRECT) if direct else (flags & ~_O_DIRECT))
    except OSError as exc:
        if exc.errno not in _REFUSED:
            raise
        return False
    return True


def read_into(path: Path, offset: int, out: np.ndarray) -> None:
    """Fill `out` (C-contiguous) with the file's bytes at `offset`, around the page cache where the filesystem
    allows it; a file that ends first is truncated."""
    view = memoryview(out.reshape(-1)).cast("B") if out.nbytes else memoryview(b"")
    done = 0
    for chunk in read_chunks(path, offset, len(view)):
        view[done : done + len(chunk)] = chunk
        done += len(chunk)


def read_chunks(path: Path, offset: int, length: int) -> Iterator[memoryview]:
    """The file's `length` bytes at `offset`, in consecutive pieces of at most `CHUNK`, read around the page cache
    where the filesystem allows it. Each piece lies in a buffer the next one reuses; a file that ends first is
    truncated."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        done = 0
        if set_direct(fd, True):
            for chunk in _read_direct(fd, offset, length):
                done += len(chunk)
                yield chunk
        if done < length:
            set_direct(fd, False)
            for chunk in _read_buffered(fd, offset + done, length - done):
                done += len(chunk)
                yield chunk
    finally:
        os.close(fd)
    if done < length:
        raise CorruptCheckpoint(f"{path}: file ends {length - done} bytes early: it is truncated")


def _read_buffer() -> np.ndarray:
    buffer = getattr(_buffers, "read", None)
    if buffer is None or buffer.nbytes < CHUNK:
        buffer = _buffers.read = mapped_buffer(CHUNK)
    return buffer


def _read_direct(fd: int, offset: int, length: int) -> Iterator[memoryview]:
    """Pieces read through O_DIRECT: all of them, fewer where the file ends, or where the filesystem refused a
    read (the caller goes on without O_DIRECT)."""
    buffer = _read_buffer()
    done = 0
    while done < length:
        position = offset + done
        start = position - position % ALIGN
        skip = position - start
        size = min(CHUNK, -(-(skip + length - done) // ALIGN) * ALIGN)
        try:
            got = os.preadv(fd, [buffer[:size]], start)
        except OSError as exc:
            if exc.errno not in _REFUSED:
                raise
            return
        take = min(got - skip, length - done)
        if take <= 0:
            return
        yield memoryview(buffer[skip : skip + take])
        done += take
        if got < size:  # the file ends here
            return


def _read_buffered(fd: int, offset: int, length: int) -> Iterator[memoryview]:
    buffer = _read_buffer()
    done = 0
    while done < length:
        got = os.preadv(fd, [buffer[: min(CHUNK, length - done)]], offset + done)
        if not got:
            return
        yield memoryview(buffer[:got])
        done += got


class DirectWriteFile:
    """A new file written front to back, around the page cache where the filesystem allows it.

    Writes are copied into one of two staging buffers (aligned); a full one is written by a thread of its own
    while the next fills, so the device and the caller work at once. A seek (zip writers rewrite their headers)
    writes what is staged and goes on through the page cache, as does a file whose filesystem refuses O_DIRECT;
    the staging still gathers small writes (a pickle's opcodes) into large ones. Errors of a background write
    (a full disk) are raised by the next call.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._buffers = [mapped_buffer(CHUNK), mapped_buffer(CHUNK)]
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        self._direct = set_direct(self._fd, True)  # until a seek: the writing thread may also turn it off
        self._position = 0
        self._staged = 0
        self._pending: Future | None = None
        self._flusher = ThreadPoolExecutor(1, thread_name_prefix="vlhub-direct-write")

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            take = min(CHUNK - self._staged, len(view) - done)
            self._buffers[0][self._staged : self._staged + take] = view[done : done + take]
            self._staged += take
            done += take
            if self._staged == CHUNK:
                self._write_staged()
        self._position += len(view)
        return len(view)

    def _write_staged(self) -> None:
        """Hand the full staging buffer to the writing thread and fill the other one next."""
        self._wait()
        full = self._buffers[0]
        self._buffers.reverse()
        self._pending = self._flusher.submit(self._write_block, memoryview(full))
        self._staged = 0

    def _write_block(self, view: memoryview) -> None:
        try:
            written = os.write(self._fd, view)
        except OSError as exc:
            if exc.errno not in _REFUSED or not self._direct:
                raise
            written = 0
        if written < len(view):  # refused, or the device took part of the block: the rest through the page cache
            set_direct(self._fd, False)
            _write_all(self._fd, view[written:])

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _write_what_is_staged(self) -> None:
        """Write what is staged, through the page cache from here on (its length is no whole block)."""
        self._wait()
        if self._direct:
            self._direct = False
            set_direct(self._fd, False)
        _write_all(self._fd, memoryview(self._buffers[0][: self._staged]))
        self._staged = 0

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._write_what_is_staged()
        self._position = os.lseek(self._fd, offset, whence)
        return self._position

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        """Staged bytes wait for a whole buffer, a seek or the close."""

    def close(self) -> None:
        """Write what is staged and close; a write that failed in the background is raised here."""
        if self._fd < 0:
            return
        try:
            self._write_what_is_staged()
        finally:
            self._flusher.shutdown()
            # forgotten before it is closed: a close that reports an error has still freed the number, which
            # another file may get at once
            fd, self._fd = self._fd, -1
            self._buffers = []
            os.close(fd)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        written = os.write(fd, view)
        view = view[written:]
