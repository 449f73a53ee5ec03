"""Torch zip checkpoints (what `torch.save` writes, e.g. `pytorch_model-00001-of-00010.bin`): reader and writer.

torch is never imported: `data.pkl` is scanned by the restricted pickle VM and tensor bytes are read
straight from their stored (uncompressed) zip entries.
"""

from __future__ import annotations

import io
import lzma
import math
import struct
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

import numpy as np

from vlhub.errors import CorruptCheckpoint
from vlhub.formats.base import OpenTensorFile
from vlhub.formats.io_utils import StoredBytes, TensorData, output_array, read_exact_into, write_array
from vlhub.formats.pickle_codec import (
    Global,
    PickleEmitter,
    Reduced,
    checked_shape,
    scan_pickle,
    stream_size,
)
from vlhub.formats.tensors import TensorMeta, dtype_info

STORAGE_TYPES: dict[str, str] = {
    "BFloat16Storage": "bfloat16",
    "HalfStorage": "float16",
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}
_STORAGE_TYPE_OF = {dtype: storage_type for storage_type, dtype in STORAGE_TYPES.items()}
_REBUILD_TENSOR = "torch._utils._rebuild_tensor_v2"
_REBUILD_PARAMETER = "torch._utils._rebuild_parameter"
TORCH_GLOBALS = frozenset(
    {"collections.OrderedDict", _REBUILD_TENSOR, _REBUILD_PARAMETER} | {f"torch.{name}" for name in STORAGE_TYPES}
)

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, …, file name length, extra field length
_LOCAL_HEADER_SIGNATURE = b"PK\x03\x04"
_MAX_DATA_PKL_BYTES = 1 << 28
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,
    NotImplementedError,
    RuntimeError,
    EOFError,
    OSError,
    ValueError,
    struct.error,
)


@dataclass(frozen=True)
class _StorageRef:
    """A persistent id `('storage', storage_type, key, location, numel)` from data.pkl."""

    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class _TorchTensor:
    """One tensor: a strided view, in elements, of a storage."""

    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def is_c_contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride)):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    @property
    def span(self) -> int:
        """How many storage elements, from `offset` on, the view touches."""
        if 0 in self.shape:
            return 0
        return 1 + sum((size - 1) * stride for size, stride in zip(self.shape, self.stride))


class TorchBinFile(OpenTensorFile):
    """A torch zip checkpoint opened lazily: data.pkl is scanned, tensor bytes stay in the zip."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stream: BinaryIO = open(self.path, "rb")
        try:
            with _zip_errors(self.path.name):
                self._tensors, self._data_offsets = self._scan()
        except BaseException:
            self._stream.close()
            raise

    def _scan(self) -> tuple[dict[str, _TorchTensor], dict[str, int]]:
        name = self.path.name
        if not zipfile.is_zipfile(self._stream):
            raise CorruptCheckpoint(
                f"{name} is not a zip torch checkpoint; only the zip format of torch.save (torch >= 1.6) "
                "is supported, re-save legacy files with a current torch"
            )
        archive = zipfile.ZipFile(self._stream)
        entries = archive.infolist()
        prefix = entries[0].filename.split("/", 1)[0] if entries else ""
        records = {info.filename: info for info in entries}
        pickle_info = records.get(f"{prefix}/data.pkl")
        if pickle_info is None or pickle_info.file_size > _MAX_DATA_PKL_BYTES:
            raise CorruptCheckpoint(f"{name}: no usable {prefix}/data.pkl in the zip")
        byteorder = records.get(f"{prefix}/byteorder")
        if byteorder is not None and (byteorder.file_size != len(b"little") or archive.read(byteorder) != b"little"):
            raise CorruptCheckpoint(f"{name}: only little-endian torch checkpoints are supported")
        where = f"{name}:{pickle_info.filename}"
        root = scan_pickle(
            io.BytesIO(archive.read(pickle_info)), where, TORCH_GLOBALS, lambda pid: _storage_ref(pid, where)
        )
        tensors = _collect_tensors(root, where)
        file_size = stream_size(self._stream)
        data_offsets: dict[str, int] = {}
        for tensor_name, tensor in tensors.items():
            storage = tensor.storage
            info = records.get(f"{prefix}/data/{storage.key}")
            if info is None:
                raise CorruptCheckpoint(f"{name}: tensor {tensor_name!r} has no storage entry data/{storage.key}")
            if storage.key not in data_offsets:
                data_offsets[storage.key] = self._data_offset(info, file_size)
            if storage.numel * dtype_info(storage.dtype).itemsize > info.file_size:
                raise CorruptCheckpoint(f"{name}: storage data/{storage.key} is shorter than its declared size")
            if tensor.span and tensor.offset + tensor.span > storage.numel:
                raise CorruptCheckpoint(f"{name}: tensor {tensor_name!r} reaches past the end of its storage")
        return tensors, data_offsets

    def _data_offset(self, info: zipfile.ZipInfo, file_size: int) -> int:
        """Where a stored entry's bytes start: after its local header (whose extra field is not the central one)."""
        name = self.path.name
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise CorruptCheckpoint(
                f"{name}: tensor entry {info.filename} is compressed; torch stores tensor data uncompressed"
            )
        self._stream.seek(info.header_offset)
        signature, name_length, extra_length = _LOCAL_HEADER.unpack(self._stream.read(_LOCAL_HEADER.size))
        if signature != _LOCAL_HEADER_SIGNATURE:
            raise CorruptCheckpoint(f"{name}: bad local zip header for {info.filename}")
        offset = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
        if offset + info.file_size > file_size:
            raise CorruptCheckpoint(f"{name}: tensor entry {info.filename} runs past the end of the file")
        return offset

    def tensors(self) -> dict[str, TensorMeta]:
        """Every tensor in data.pkl order; bfloat16 storages are reported as "bfloat16"."""
        return {
            name: TensorMeta(name, tensor.storage.dtype, tensor.shape, shard=self.path.name)
            for name, tensor in self._tensors.items()
        }

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """One tensor as a C-contiguous array in its storage dtype (bfloat16 as uint16 bits), into `out` if given."""
        tensor = self._tensors[name]
        dtype = dtype_info(tensor.storage.dtype).storage
        start = self._data_offsets[tensor.storage.key] + tensor.offset * dtype.itemsize
        array = output_array(tensor.shape, dtype, out)
        if tensor.is_c_contiguous:
            read_exact_into(self._stream, start, array, self.path.name)
            return array
        # a view (transpose, slice, expand): read the storage range it touches, then copy into C order
        touched = np.empty(tensor.span, dtype=dtype)
        read_exact_into(self._stream, start, touched, self.path.name)
        strides = tuple(stride * dtype.itemsize for stride in tensor.stride)
        np.copyto(array, np.lib.stride_tricks.as_strided(touched, tensor.shape, strides, writeable=False))
        return array

    def stored_bytes(self, name: str) -> StoredBytes | None:
        """Where one tensor's bytes lie, when they are stored plainly in C order (not for views)."""
        tensor = self._tensors[name]
        if not tensor.is_c_contiguous:
            return None
        itemsize = dtype_info(tensor.storage.dtype).itemsize
        start = self._data_offsets[tensor.storage.key] + tensor.offset * itemsize
        return StoredBytes(self.path, start, math.prod(tensor.shape) * itemsize)


@contextmanager
def _zip_errors(name: str) -> Iterator[None]:
    """zipfile reports damage with many exception types; the caller gets `CorruptCheckpoint`."""
    try:
        yield
    except _ZIP_ERRORS as exc:
        raise CorruptCheckpoint(f"{name}: damaged zip archive ({type(exc).__name__}: {exc})") from None


def _storage_ref(pid: Any, where: str) -> _StorageRef:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
        raise CorruptCheckpoint(f"{where}: unsupported persistent id")
    _, storage_type, key, _location, numel = pid
    if not (isinstance(storage_type, Global) and storage_type.module == "torch" and storage_type.name in STORAGE_TYPES):
        raise CorruptCheckpoint(f"{where}: persistent id does not name a storage type")
    if not isinstance(key, str) or type(numel) is not int or numel < 0:
        raise CorruptCheckpoint(f"{where}: malformed storage persistent id")
    return _StorageRef(key, STORAGE_TYPES[storage_type.name], numel)


def _collect_tensors(root: Any, where: str) -> dict[str, _TorchTensor]:
    if not isinstance(root, dict):
        raise CorruptCheckpoint(f"{where}: expected a flat state dict of tensors")
    tensors: dict[str, _TorchTensor] = {}
    for name, value in root.items():
        if not isinstance(name, str):
            raise CorruptCheckpoint(f"{where}: tensor names must be strings")
        tensors[name] = _parse_tensor(value, f"{where}: tensor {name!r}")
    return tensors


def _parse_tensor(value: Any, where: str) -> _TorchTensor:
    """Read `_rebuild_tensor_v2(storage, offset, size, stride, …)`, possibly wrapped in `_rebuild_parameter`."""
    if isinstance(value, Reduced) and value.func.qualname == _REBUILD_PARAMETER and value.args and not value.built:
        value = value.args[0]
    if not (isinstance(value, Reduced) and value.func.qualname == _REBUILD_TENSOR) or value.built:
        raise CorruptCheckpoint(f"{where}: expected a plain tensor")
    if len(value.args) not in (6, 7):
        raise CorruptCheckpoint(f"{where}: malformed _rebuild_tensor_v2 call")
    storage, offset, size, stride = value.args[:4]
    if not isinstance(storage, _StorageRef) or type(offset) is not int or offset < 0:
        raise CorruptCheckpoint(f"{where}: malformed _rebuild_tensor_v2 call")
    shape, strides = checked_shape(size, where), checked_shape(stride, where)
    if len(shape) != len(strides):
        raise CorruptCheckpoint(f"{where}: size and stride differ in length")
    return _TorchTensor(storage, offset, shape, strides)


class TorchBinShardWriter:
    """Writes a torch zip checkpoint that `torch.load(weights_only=True)` reads, with or without mmap.

    data.pkl (an OrderedDict of `_rebuild_tensor_v2` tensors, one storage each) comes first, then
    each tensor's bytes as a stored, 64-byte aligned entry streamed from the array. The stream must
    be seekable; `metadata` is ignored.
    """

    def __init__(
        self, stream: BinaryIO, tensors: Sequence[TensorMeta], metadata: Mapping[str, str] | None = None
    ) -> None:
        self._stream = stream
        self._keys = {meta.name: str(index) for index, meta in enumerate(tensors)}
        self._zip = zipfile.ZipFile(stream, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._write_record("data.pkl", _data_pickle(tensors))
        self._write_record("byteorder", b"little")

    def write(self, meta: TensorMeta, array: TensorData) -> None:
        with self._open_record(f"data/{self._keys[meta.name]}", meta.nbytes) as record:
            write_array(record, meta, array)

    def finish(self) -> None:
        # no ".format_version": it lets torch compute storage offsets assuming its own zip layout
        self._write_record("version", b"3\n")
        self._zip.close()

    def _write_record(self, name: str, data: bytes) -> None:
        with self._open_record(name, len(data)) as record:
            record.write(data)

    def _open_record(self, name: str, size: int) -> IO[bytes]:
        """A stored entry whose data starts on a 64-byte boundary, padded like torch's writer does."""
        info = zipfile.ZipInfo(f"archive/{name}", date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        zip64 = size > zipfile.ZIP64_LIMIT
        # local header: fixed part, name, our "FB" padding field, and zipfile's zip64 field if any
        header_size = _LOCAL_HEADER.size + len(info.filename.encode()) + 4 + (20 if zip64 else 0)
        padding = -(self._stream.tell() + header_size) % 64
        info.extra = b"FB" + struct.pack("<H", padding) + b"Z" * padding
        return self._zip.open(info, "w", force_zip64=zip64)


def _data_pickle(tensors: Sequence[TensorMeta]) -> bytes:
    """data.pkl as `torch.save` writes it: protocol 2, an OrderedDict of `_rebuild_tensor_v2` calls."""
    unsupported = sorted({meta.dtype for meta in tensors} - set(_STORAGE_TYPE_OF))
    if unsupported:
        raise ValueError(f"torch checkpoints cannot hold {', '.join(unsupported)} tensors")
    buffer = io.BytesIO()
    emit = PickleEmitter(buffer, protocol=2)
    emit.global_ref("collections", "OrderedDict")
    emit.empty_tuple()
    emit.reduce()
    for key, meta in enumerate(tensors):
        emit.text(meta.name)
        emit.global_ref("torch._utils", "_rebuild_tensor_v2")
        emit.mark()
        emit.mark()
        emit.text("storage")
        emit.global_ref("torch", _STORAGE_TYPE_OF[meta.dtype])
        emit.values(str(key), "cpu", meta.numel)
        emit.tuple_from_mark()
        emit.persistent_id()
        emit.values(0, tuple(meta.shape), _c_strides(meta.shape), False)
        emit.global_ref("collections", "OrderedDict")
        emit.empty_tuple()
        emit.reduce()
        emit.tuple_from_mark()
        emit.reduce()
        emit.setitem()
    emit.stop()
    return buffer.getvalue()


def _c_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides = []
    step = 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))
