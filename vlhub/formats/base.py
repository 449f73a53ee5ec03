"""The two contracts every checkpoint format implements: a lazy reader and a streaming shard writer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar

import numpy as np

from vlhub.formats.io_utils import StoredBytes, TensorData
from vlhub.formats.tensors import TensorMeta

_Self = TypeVar("_Self", bound="OpenTensorFile")


class TensorFile(Protocol):
    """One checkpoint file, opened lazily.

    Opening parses only the header (or scans the pickle): `tensors()` is known before any data is
    read, and `read()` reads exactly one tensor's bytes. Corrupt input raises `CorruptCheckpoint`.
    """

    path: Path

    def tensors(self) -> dict[str, TensorMeta]:
        """Every tensor in the file, in file order, with `shard` set to the file name."""
        ...

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """One tensor as a C-contiguous array in its storage dtype (bfloat16 as uint16 bits); `out`, a
        C-contiguous array of that shape and dtype, receives it instead of a new array when given."""
        ...

    def stored_bytes(self, name: str) -> StoredBytes | None:
        """Where the tensor's bytes lie when the file holds them plainly in C order, so a writer can
        copy them without decoding; None when they must be read (a view, a split or text payload)."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> TensorFile: ...

    def __exit__(self, *exc: object) -> None: ...


class OpenTensorFile:
    """Plumbing every reader shares: the open `_stream`, closed by `close()` or on leaving a `with`."""

    _stream: BinaryIO

    def close(self) -> None:
        self._stream.close()

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ShardWriter(Protocol):
    """Writes one shard into an open binary stream, tensor by tensor.

    The constructor receives every tensor of the shard up front (formats with a header need the
    layout before the data); `write()` is then called once per tensor in that same order, and
    `finish()` once at the end. A shard is never held in memory as a whole.
    """

    def __init__(
        self, stream: BinaryIO, tensors: Sequence[TensorMeta], metadata: Mapping[str, str] | None = None
    ) -> None: ...

    def write(self, meta: TensorMeta, array: TensorData) -> None:
        """One tensor: an array, its `Pieces` in order, or `StoredBytes` copied from the source file in small
        pieces."""
        ...

    def finish(self) -> None: ...
