"""Byte-level helpers every format shares: positioned exact reads and zero-copy array writes."""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np

from vlhub.errors import CorruptCheckpoint
from vlhub.tensors import TensorMeta, dtype_info

# Read in 16 MiB pieces: one huge read() defeats kernel readahead. Measured on a cold 1.09 GB tensor:
# a single read ran at 0.44 GB/s, 16 MiB pieces at 2.4 GB/s (64 MiB pieces were as slow as one read).
_READ_CHUNK = 16 << 20
# one copy_file_range call moves at most 64 MiB, so a progress bar stays live
_COPY_CHUNK = 64 << 20
# copy_file_range refusals that mean "not between these files", not "the copy failed"
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})


def output_array(shape: tuple[int, ...], dtype: np.dtype, out: np.ndarray | None) -> np.ndarray:
    """`out` when a caller lends a buffer for the tensor (checked), else a new array."""
    if out is None:
        return np.empty(shape, dtype=dtype)
    if out.shape != tuple(shape) or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"output buffer is {out.dtype}{list(out.shape)}, the tensor is {dtype}{list(shape)}")
    return out


def read_exact_into(file: BinaryIO, offset: int, array: np.ndarray, path: Path | str) -> None:
    """Fill `array` (C-contiguous) with the bytes at `offset`, or raise if the file ends first."""
    view = memoryview(array.reshape(-1)).cast("B") if array.nbytes else memoryview(b"")
    file.seek(offset)
    done = 0
    while done < len(view):
        n = file.readinto(view[done : done + _READ_CHUNK])
        if not n:
            raise CorruptCheckpoint(f"{path}: file ends {len(view) - done} bytes early: it is truncated")
        done += n


@dataclass(frozen=True)
class StoredBytes:
    """A tensor's bytes where they lie in a file, already in C order: copied out, never decoded."""

    path: Path
    offset: int
    length: int


# what a writer accepts for one tensor: an array, or bytes to copy from a source file
TensorData = Union[np.ndarray, StoredBytes]


def copy_stored_bytes(source: StoredBytes, stream: BinaryIO, on_bytes: Callable[[int], None] | None = None) -> None:
    """Append a tensor's bytes from its file to `stream`.

    In the kernel (copy_file_range with sequential readahead, what cp does) when `stream` is a plain
    file; otherwise, and where the filesystems refuse, through one reusable 16 MiB buffer (a stream that
    hashes what it is given must see the bytes). Cold 2 GB copies here, median of 6 rounds: 2.2 s in
    the kernel, 2.1 s for cp, 4.1 s through the buffer.
    """
    advance = on_bytes or (lambda n: None)
    with open(source.path, "rb", buffering=0) as file:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(file.fileno(), source.offset, source.length, os.POSIX_FADV_SEQUENTIAL)
        if not _copy_in_kernel(file, source, stream, advance):
            _copy_through_buffer(file, source, stream, advance)


def _copy_in_kernel(file: BinaryIO, source: StoredBytes, stream: BinaryIO, advance: Callable[[int], None]) -> bool:
    try:
        target = stream.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return False
    stream.flush()
    done = 0
    while done < source.length:
        try:
            n = os.copy_file_range(file.fileno(), target, min(_COPY_CHUNK, source.length - done), source.offset + done)
        except OSError as exc:
            if done or exc.errno not in _NO_KERNEL_COPY:
                raise
            return False
        if not n:
            raise CorruptCheckpoint(f"{source.path}: file ends {source.length - done} bytes early: it is truncated")
        done += n
        advance(n)
    return True


def _copy_through_buffer(file: BinaryIO, source: StoredBytes, stream: BinaryIO,
                         advance: Callable[[int], None]) -> None:
    buffer = bytearray(min(source.length, _READ_CHUNK))
    view = memoryview(buffer)
    file.seek(source.offset)
    left = source.length
    while left:
        n = file.readinto(view[: min(left, len(buffer))])
        if not n:
            raise CorruptCheckpoint(f"{source.path}: file ends {left} bytes early: it is truncated")
        stream.write(view[:n])
        advance(n)
        left -= n


def write_array(stream: BinaryIO, meta: TensorMeta, array: TensorData) -> None:
    """Write a tensor's bytes (from an array's buffer, or copied from its file) after checking them."""
    if isinstance(array, StoredBytes):
        if array.length != meta.nbytes:
            raise ValueError(f"{meta.name}: {array.length} stored bytes, planned {meta.nbytes}")
        copy_stored_bytes(array, stream)
        return
    storage = dtype_info(meta.dtype).storage
    if array.dtype != storage or tuple(array.shape) != meta.shape:
        raise ValueError(
            f"{meta.name}: got {array.dtype}{list(array.shape)}, planned {meta.dtype}{list(meta.shape)}"
        )
    array = np.ascontiguousarray(array)
    if array.nbytes:
        stream.write(memoryview(array.reshape(-1)).cast("B"))
