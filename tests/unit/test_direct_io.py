"""Reads and writes around the page cache (vlhub/formats/direct_io.py): the bytes are the file's whatever the
offsets, lengths and piece sizes (none of them aligned to the device's blocks), and the same where a filesystem
refuses O_DIRECT for the file or for one request, where a file is truncated, or where the disk fills."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from vlhub.errors import CorruptCheckpoint
from vlhub.formats import direct_io
from vlhub.formats.direct_io import DirectWriteFile, read_into

CHUNK = 3 * direct_io.ALIGN  # small pieces, so every test crosses many of them


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch) -> None:
    monkeypatch.setattr(direct_io, "CHUNK", CHUNK)


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, bytes]:
    payload = np.random.default_rng(0).integers(0, 256, 10 * direct_io.ALIGN + 123, np.uint8).tobytes()
    path = tmp_path / "data.bin"
    path.write_bytes(payload)
    return path, payload


def _refuse_direct(monkeypatch, *, on: str) -> list[int]:
    """Make the filesystem refuse O_DIRECT: when it is asked for (`set`), or for the reads and writes of a file
    that has it (`io`). Returns the refusals counted."""
    refused: list[int] = []
    if on == "set":
        monkeypatch.setattr(direct_io, "set_direct", lambda fd, direct: False)
        return refused

    def has_direct(fd: int) -> bool:
        return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)

    real_preadv, real_write = os.preadv, os.write

    def preadv(fd: int, buffers: list, offset: int) -> int:
        if has_direct(fd):
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    def write(fd: int, data: object) -> int:
        if has_direct(fd):
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(os, "write", write)
    return refused


@pytest.mark.parametrize(("offset", "length"), [(0, 0), (0, 1), (1, 4095), (4095, 2), (4096, 4096), (7, 12_345),
                                                (123, 10 * 4096), (0, 10 * 4096 + 123), (40_000, 1083)])
@pytest.mark.parametrize("refusal", [None, "set", "io"])
def test_reads_give_the_files_bytes_at_any_offset(data: tuple[Path, bytes], monkeypatch, offset: int, length: int,
                                                  refusal: str | None) -> None:
    path, payload = data
    if refusal:
        _refuse_direct(monkeypatch, on=refusal)
    out = np.full(length, 0xAA, np.uint8)
    read_into(path, offset, out)
    assert out.tobytes() == payload[offset : offset + length]


@pytest.mark.parametrize("refusal", [None, "set"])
def test_a_file_that_ends_early_is_named_as_truncated(data: tuple[Path, bytes], monkeypatch,
                                                      refusal: str | None) -> None:
    path, payload = data
    if refusal:
        _refuse_direct(monkeypatch, on=refusal)
    with pytest.raises(CorruptCheckpoint, match=f"{path.name}: file ends 100 bytes early: it is truncated"):
        read_into(path, len(payload) - 5000, np.empty(5100, np.uint8))


def test_this_machines_files_are_written_and_read_around_the_page_cache(tmp_path: Path) -> None:
    """The point of the module, where the filesystem allows it (ext4 and xfs do; tmpfs before Linux 6.6 does not)."""
    probe = DirectWriteFile(tmp_path / "probe")
    try:
        direct = bool(fcntl.fcntl(probe._fd, fcntl.F_GETFL) & os.O_DIRECT)
    finally:
        probe.close()
    if not direct:
        pytest.skip(f"{tmp_path}'s filesystem takes no O_DIRECT")
    fd = os.open(tmp_path / "probe", os.O_RDONLY)
    try:
        assert direct_io.set_direct(fd, True)
    finally:
        os.close(fd)


def _pieces() -> list[bytes]:
    """Pieces of every size around the staging buffer's: single bytes (a pickle's opcodes), a few blocks, more
    than a whole buffer."""
    rng = np.random.default_rng(1)
    sizes = [1, 7, CHUNK - 8, 1, CHUNK, 3 * CHUNK + 5, 4096, 2, 2 * CHUNK, 11]
    return [rng.integers(0, 256, size, np.uint8).tobytes() for size in sizes]


@pytest.mark.parametrize("refusal", [None, "set", "io"])
def test_writes_make_the_file_of_their_pieces(tmp_path: Path, monkeypatch, refusal: str | None) -> None:
    refused = _refuse_direct(monkeypatch, on=refusal) if refusal else []
    path = tmp_path / "out.bin"
    pieces = _pieces()
    file = DirectWriteFile(path)
    for piece in pieces:
        file.write(memoryview(piece))
    assert file.tell() == sum(map(len, pieces))
    file.close()
    assert path.read_bytes() == b"".join(pieces)
    if refusal == "io":
        assert refused  # the refused write went on through the page cache


def test_a_seek_goes_on_through_the_page_cache(tmp_path: Path) -> None:
    """A zip writer (torch's format) rewrites its local headers: the file is the one Python's own file makes."""
    members = {"a/data/0": bytes(range(256)) * 100, "a/data/1": b"x" * (2 * CHUNK + 1), "a/version": b"3\n"}
    ours, theirs = tmp_path / "ours.zip", tmp_path / "theirs.zip"
    for path, stream in ((ours, DirectWriteFile(ours)), (theirs, open(theirs, "wb"))):  # noqa: SIM115
        with zipfile.ZipFile(stream, "w", zipfile.ZIP_STORED) as archive:  # type: ignore[arg-type]
            for name, payload in members.items():
                with archive.open(name, "w", force_zip64=True) as member:
                    member.write(payload)
        stream.close()
    assert ours.read_bytes() == theirs.read_bytes()
    with zipfile.ZipFile(ours) as archive:
        assert {name: archive.read(name) for name in archive.namelist()} == members


def test_a_disk_that_fills_behind_the_writer_is_raised_by_the_next_call(tmp_path: Path, monkeypatch) -> None:
    """The staged buffers are written by a thread of their own: its ENOSPC is not lost."""
    real_write = os.write

    def full(fd: int, data: object) -> int:
        if len(memoryview(data)) == CHUNK:  # a whole staged buffer, written in the background
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    file = DirectWriteFile(tmp_path / "out.bin")
    with pytest.raises(OSError) as raised:
        for _ in range(4):
            file.write(bytes(CHUNK))
        file.close()
    assert raised.value.errno == errno.ENOSPC
    with contextlib.suppress(OSError):  # what is still staged meets the same full disk
        file.close()
    file.close()  # the descriptor is released: closing again does nothing


def test_a_kernel_without_huge_pages_still_gives_buffers(monkeypatch) -> None:
    """madvise(MADV_HUGEPAGE) fails with EINVAL on a kernel built without transparent huge pages (as for an advice
    it does not know, which this stands in for): the buffer is made without it, as numpy does."""
    monkeypatch.setattr(direct_io.mmap, "MADV_HUGEPAGE", 0x7FFF, raising=False)
    buffer = direct_io.mapped_buffer(3 * direct_io.ALIGN)
    buffer[:] = 7
    assert buffer.nbytes == 3 * direct_io.ALIGN and buffer.ctypes.data % direct_io.ALIGN == 0 and buffer.all()


def test_small_writes_are_gathered_without_o_direct(tmp_path: Path, monkeypatch) -> None:
    """Where the filesystem refuses O_DIRECT (and after a seek) a pickle's one-byte opcodes still reach the kernel
    in whole buffers, not one system call each."""
    _refuse_direct(monkeypatch, on="set")
    calls: list[int] = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: calls.append(len(memoryview(data))) or real_write(fd, data))
    path = tmp_path / "out.bin"
    file = DirectWriteFile(path)
    for value in range(5 * CHUNK):
        file.write(bytes([value % 251]))
    file.close()
    assert path.read_bytes() == bytes(value % 251 for value in range(5 * CHUNK))
    assert len(calls) == 5


def test_a_close_that_fails_is_not_repeated_on_another_file(tmp_path: Path, monkeypatch) -> None:
    """A close that reports a delayed write error (NFS, FUSE) has freed the descriptor all the same; closing again
    (the writer's abort does) must not close whatever file got that number since."""
    closed: list[int] = []
    real_close = os.close

    def failing_close(fd: int) -> None:
        real_close(fd)
        closed.append(fd)
        raise OSError(errno.EIO, "Input/output error")

    file = DirectWriteFile(tmp_path / "out.bin")
    file.write(b"x" * 10)
    monkeypatch.setattr(os, "close", failing_close)
    with pytest.raises(OSError, match="Input/output error"):
        file.close()
    monkeypatch.setattr(os, "close", real_close)
    other = os.open(tmp_path / "other", os.O_WRONLY | os.O_CREAT)  # may get the freed number
    try:
        file.close()
        os.fstat(other)  # still open
    finally:
        real_close(other)
    assert len(closed) == 1
