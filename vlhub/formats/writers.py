"""Sharded, atomic checkpoint writing in any format, one tensor (or one piece of a tensor) at a time."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vlhub.faults import commit_point
from vlhub.formats.base import ShardWriter
from vlhub.formats.direct_io import DirectWriteFile
from vlhub.formats.io_utils import TensorData
from vlhub.formats.registry import FORMATS, Format
from vlhub.formats.tensors import TensorMeta
from vlhub.owned import temporary_name


def plan_shards(tensors: Sequence[TensorMeta], max_shard_size: int) -> list[list[TensorMeta]]:
    """Split tensors, in order, into shards of at most `max_shard_size` bytes (a bigger tensor gets its own)."""
    shards: list[list[TensorMeta]] = [[]]
    size = 0
    for meta in tensors:
        if shards[-1] and size + meta.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(meta)
        size += meta.nbytes
    return shards


class _HashingFile:
    """A file being written that hashes its bytes on the way out (sha256 for the manifest).

    Large writes are hashed on `hasher` while the write itself runs, so hashing costs no extra time
    when the disk is the bottleneck (both release the GIL). The bytes go around the page cache where the
    filesystem allows it (`direct_io`: nothing reads a new checkpoint's bytes back soon, and the kernel's
    page-cache work was most of a conversion's CPU). A seek (zip rewrites its local headers) breaks the
    running hash; `sha256()` then reads the file back.
    """

    _OVERLAP = 1 << 20  # below this, a second thread costs more than it saves

    def __init__(self, path: Path, hasher: ThreadPoolExecutor) -> None:
        self.path = path
        self._file = DirectWriteFile(path)
        self._hash = hashlib.sha256()
        self._hasher = hasher
        self._sequential = True

    def write(self, data: bytes | memoryview) -> int:
        if not self._sequential:
            return self._file.write(data)
        if len(data) < self._OVERLAP:
            self._hash.update(data)
            return self._file.write(data)
        hashed = self._hasher.submit(self._hash.update, data)
        try:
            return self._file.write(data)
        finally:
            hashed.result()  # the caller may reuse `data` once write returns

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._sequential = False
        return self._file.seek(offset, whence)

    def fileno(self) -> int:
        # without a descriptor, byte copies come through write() and are hashed
        raise io.UnsupportedOperation("a hashing file is written through write()")

    def __getattr__(self, name: str) -> object:  # tell, flush, seekable, ...: the file's own
        return getattr(self._file, name)

    def close(self) -> None:
        self._file.close()

    def sha256(self) -> str:
        return self._hash.hexdigest() if self._sequential else file_sha256(self.path)


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 16 MiB pieces."""
    return hash_file_into(path, hashlib.sha256()).hexdigest()


def file_entry(path: Path) -> dict:
    """A manifest's record of a file: its sha256 and size."""
    return {"sha256": file_sha256(path), "size": path.stat().st_size}


def hash_file_into(path: Path, digest: Any, on_bytes: Callable[[int], None] | None = None) -> Any:
    """Feed a file to a hashlib object in 16 MiB pieces (reporting each piece's size); return the object."""
    with open(path, "rb") as file:
        while chunk := file.read(16 << 20):
            digest.update(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return digest


class CheckpointWriter:
    """Writes a checkpoint whose tensors are all known up front, streaming their data in that order.

    Shards follow the format's naming (`model-00001-of-00003.safetensors`, `model_state-...pdparams`,
    `pytorch_model-...bin`) with an index file, or the single-file name when one shard suffices.
    Everything is written under temporary names and renamed only by `close()`; leaving the context
    on an exception removes the temporaries, so no file ever exists under a final name half-written.
    """

    def __init__(
        self,
        out_dir: Path | str,
        format: str | Format,
        tensors: Sequence[TensorMeta],
        *,
        max_shard_size: int | None = None,
        metadata: Mapping[str, str] | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        self.format = FORMATS[format] if isinstance(format, str) else format
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        limit = max_shard_size or self.format.default_max_shard_size
        self._shards = plan_shards(tensors, limit)
        count = len(self._shards)
        self.shard_names = (
            [self.format.single_file] if count == 1 else [self.format.shard_name(i + 1, count) for i in range(count)]
        )
        self._order = [meta for shard in self._shards for meta in shard]
        self._metadata = metadata
        self._on_bytes = on_bytes
        self._next = 0
        self._shard_index = -1
        self._written_in_shard = 0
        self._stream: _HashingFile | None = None
        self._writer: ShardWriter | None = None
        self._temporaries: list[Path] = []
        self._hashes: list[str] = []
        self.written: list[Path] = []
        self.sha256: dict[str, str] = {}
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="vlhub-sha256")

    @property
    def weight_map(self) -> dict[str, str]:
        return {meta.name: name for shard, name in zip(self._shards, self.shard_names) for meta in shard}

    def write(self, name: str, array: TensorData) -> None:
        """Write the next tensor (an array, its pieces in order, or its bytes in a source file); names must come
        in the order the writer was given."""
        if self._next >= len(self._order) or self._order[self._next].name != name:
            expected = self._order[self._next].name if self._next < len(self._order) else "nothing more"
            raise ValueError(f"tensor {name!r} written out of order; expected {expected}")
        meta = self._order[self._next]
        if self._writer is None:
            self._open_next_shard()
        assert self._writer is not None
        self._writer.write(meta, array)
        self._next += 1
        self._written_in_shard += 1
        if self._on_bytes:
            self._on_bytes(meta.nbytes)
        if self._written_in_shard == len(self._shards[self._shard_index]):
            self._finish_shard()

    def _open_next_shard(self) -> None:
        self._shard_index += 1
        self._written_in_shard = 0
        temp = temporary_name(self.out_dir / self.shard_names[self._shard_index])
        self._temporaries.append(temp)
        self._stream = _HashingFile(temp, self._hasher)
        self._writer = self.format.writer(self._stream, self._shards[self._shard_index], self._metadata)  # type: ignore[arg-type]

    def _finish_shard(self) -> None:
        assert self._writer is not None and self._stream is not None
        self._writer.finish()
        self._stream.close()
        self._hashes.append(self._stream.sha256())
        self._writer = self._stream = None

    def close(self) -> list[Path]:
        """Check every tensor was written, then give each file its final name (the index last)."""
        if self._next != len(self._order):
            missing = len(self._order) - self._next
            raise ValueError(f"{missing} tensors were never written, starting with {self._order[self._next].name!r}")
        if not self._order:  # an empty checkpoint is still a valid single file
            self._open_next_shard()
            self._finish_shard()
        for temp, name, digest in zip(self._temporaries, self.shard_names, self._hashes):
            commit_point(f"rename {name} into place")
            os.replace(temp, self.out_dir / name)
            self.written.append(self.out_dir / name)
            self.sha256[name] = digest
        self._temporaries.clear()
        if len(self.shard_names) > 1:
            index = {
                "metadata": {"total_size": sum(meta.nbytes for meta in self._order)},
                "weight_map": self.weight_map,
            }
            index_path = write_json_atomic(self.out_dir / self.format.index_file, index)
            self.written.append(index_path)
            self.sha256[index_path.name] = file_sha256(index_path)
        self._hasher.shutdown()
        return self.written

    def abort(self) -> None:
        """Remove everything written so far."""
        self._hasher.shutdown()
        if self._stream is not None:
            with contextlib.suppress(OSError):  # the write that failed (a full disk) is being raised already
                self._stream.close()
            self._writer = self._stream = None
        for temp in self._temporaries:
            temp.unlink(missing_ok=True)
        self._temporaries.clear()

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_json(path: Path, data: object) -> Path:
    """Write JSON indented, as Hugging Face writes its files."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return path


def write_json_atomic(path: Path, data: object) -> Path:
    """Write JSON (indented, as HF writes its files) under a temporary name, then rename it."""
    temp = temporary_name(path)
    try:
        write_json(temp, data)
        commit_point(f"rename {path.name} into place")
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path
