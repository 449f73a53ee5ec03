"""safetensors, read from its header and one tensor at a time, and written as a stream.

Format: an 8-byte little-endian header length, a JSON header mapping each name to dtype, shape and
`data_offsets` relative to the data section, then the data section.

A file is read only if the reference library (`safetensors` 0.8, `SafeTensors::read_metadata`) would read
it: the tensors, sorted by offset, tile the data section exactly, from its first byte to the file's last
(no gap, overlap or trailing byte). Its writer pads the header to 8 bytes; its reader does not require
that, so neither do we.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from vlhub.errors import CorruptCheckpoint
from vlhub.formats.base import OpenTensorFile
from vlhub.formats.io_utils import (
    StoredBytes,
    TensorData,
    output_array,
    parse_json,
    read_exact_into,
    write_array,
)
from vlhub.formats.tensors import BY_SAFETENSORS_CODE, TensorMeta, dtype_info

# the reference implementation refuses headers above 100 MB; so do we, before allocating one
MAX_HEADER_BYTES = 100_000_000


class SafetensorsFile(OpenTensorFile):
    """A lazily read safetensors file (see `vlhub.formats.base.TensorFile`)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stream = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        try:
            self._offsets: dict[str, tuple[int, int]] = {}
            self._metas = self._parse_header()
        except BaseException:
            self._stream.close()
            raise

    def _fail(self, problem: str) -> CorruptCheckpoint:
        return CorruptCheckpoint(f"{self.path}: {problem}")

    def _parse_header(self) -> dict[str, TensorMeta]:
        size = os.fstat(self._stream.fileno()).st_size
        if size < 8:
            raise self._fail(f"truncated safetensors file ({size} bytes, not even the 8-byte header length)")
        (header_len,) = struct.unpack("<Q", self._stream.read(8))
        if header_len > size - 8:
            raise self._fail(
                f"header length {header_len} is larger than the file ({size} bytes): truncated or not safetensors"
            )
        if header_len > MAX_HEADER_BYTES:
            raise self._fail(f"header length {header_len} exceeds the 100 MB limit")
        header = parse_json(self._stream.read(header_len), f"{self.path}: header")
        if not isinstance(header, dict):
            raise self._fail("malformed header JSON (not an object)")
        self.metadata = self._check_metadata(header.pop("__metadata__", None))
        self._data_start = 8 + header_len
        data_size = size - self._data_start
        entries = [self._check_entry(name, info, data_size) for name, info in header.items()]
        entries.sort(key=lambda entry: self._offsets[entry.name])
        # the reference reader's rule: each tensor starts where the one before it ends, the last at the file's end
        covered, previous = 0, None
        for meta in entries:
            begin, end = self._offsets[meta.name]
            if begin < covered:
                raise self._fail(f"tensors {previous!r} and {meta.name!r} overlap in the data section")
            if begin > covered:
                after = f"after tensor {previous!r}" if previous else "at the start of the data section"
                raise self._fail(f"{begin - covered} bytes {after} belong to no tensor")
            covered, previous = end, meta.name
        if covered != data_size:
            raise self._fail(f"{data_size - covered} bytes after the last tensor belong to no tensor")
        return {meta.name: meta for meta in entries}

    def _check_metadata(self, metadata: object) -> dict[str, str]:
        if metadata is None:
            return {}
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise self._fail("malformed header: __metadata__ must map strings to strings")
        return metadata

    def _check_entry(self, name: str, info: object, data_size: int) -> TensorMeta:
        if not isinstance(info, dict):
            raise self._fail(f"malformed header entry for {name!r}")
        code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(code, str) or code not in BY_SAFETENSORS_CODE:
            raise self._fail(f"tensor {name!r} has unsupported dtype {code!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise self._fail(f"tensor {name!r} has a malformed shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise self._fail(f"tensor {name!r} has malformed data_offsets {offsets!r}")
        meta = TensorMeta(name, BY_SAFETENSORS_CODE[code].name, tuple(shape), self.path.name)
        begin, end = offsets
        if end - begin != meta.nbytes:
            raise self._fail(
                f"tensor {name!r}: data_offsets span {end - begin} bytes but {code}{list(shape)} needs {meta.nbytes}"
            )
        if end > data_size:
            raise self._fail(
                f"tensor {name!r}: data_offsets {offsets} lie outside the data section "
                f"({data_size} bytes): the file is truncated"
            )
        self._offsets[name] = (begin, end)
        return meta

    def tensors(self) -> dict[str, TensorMeta]:
        """Every tensor, in data order."""
        return dict(self._metas)

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """One tensor's bytes, read from where the header says they are."""
        meta = self._metas[name]
        array = output_array(meta.shape, dtype_info(meta.dtype).storage, out)
        begin, _ = self._offsets[name]
        read_exact_into(self._stream, self._data_start + begin, array, self.path)
        return array

    def stored_bytes(self, name: str) -> StoredBytes:
        """Where one tensor's bytes lie (safetensors always stores them plainly, in C order)."""
        begin, end = self._offsets[name]
        return StoredBytes(self.path, self._data_start + begin, end - begin)


class SafetensorsShardWriter:
    """Writes one safetensors shard: the header from the planned tensors, then each tensor's bytes."""

    def __init__(
        self, stream: BinaryIO, tensors: Sequence[TensorMeta], metadata: Mapping[str, str] | None = None
    ) -> None:
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        offset = 0
        for meta in tensors:
            code = dtype_info(meta.dtype).safetensors
            header[meta.name] = {"dtype": code, "shape": list(meta.shape), "data_offsets": [offset, offset + meta.nbytes]}
            offset += meta.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned, as the reference writer does
        stream.write(struct.pack("<Q", len(raw)))
        stream.write(raw)
        self._stream = stream

    def write(self, meta: TensorMeta, array: TensorData) -> None:
        write_array(self._stream, meta, array)

    def finish(self) -> None:
        """Nothing trails the data section."""
