"""`.pdparams` (a `paddle.save` pickle of `{name: ndarray}`): a lazy reader and a streaming writer.

Neither side needs paddle. uint16 arrays are reported as logical dtype "uint16": the format does not
say whether they are bfloat16 (Paddle's convention) or real uint16, so a caller who knows decides.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from vlhub.errors import CorruptCheckpoint
from vlhub.formats.base import OpenTensorFile
from vlhub.formats.io_utils import StoredBytes, TensorData, output_array, write_array
from vlhub.formats.pickle_codec import (
    ByteSource,
    FileSpan,
    Global,
    PickleEmitter,
    Reduced,
    checked_shape,
    read_span_into,
    scan_pickle,
)
from vlhub.formats.tensors import TensorMeta, dtype_info, logical_dtype

NAME_TABLE_KEY = "StructuredToParameterName@@"
SPLIT_INFO_KEY = "UnpackBigParamInfor@@"

_RECONSTRUCT = frozenset({"numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct"})
_FROMBUFFER = frozenset({"numpy._core.numeric._frombuffer", "numpy.core.numeric._frombuffer"})
PDPARAMS_GLOBALS = _RECONSTRUCT | _FROMBUFFER | {
    "numpy.ndarray",
    "numpy.dtype",
    "_codecs.encode",
    "collections.OrderedDict",
    "builtins.bytes",
}
# numpy type codes vlhub can carry, as numpy's dtype reduce names them (without byte order)
_TYPE_CODES = frozenset({"f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1"})


@dataclass(frozen=True)
class _StoredArray:
    """Where one pickled array's bytes are and how they map to the logical array.

    The bytes are C-ordered for `stored_shape`; the logical array is that transposed by `axes`
    (Fortran order and numpy's protocol-5 'K' order both come down to this).
    """

    dtype: np.dtype
    stored_shape: tuple[int, ...]
    axes: tuple[int, ...] | None
    data: ByteSource

    @property
    def shape(self) -> tuple[int, ...]:
        if self.axes is None:
            return self.stored_shape
        return tuple(self.stored_shape[axis] for axis in self.axes)

    @property
    def nbytes(self) -> int:
        return math.prod(self.stored_shape) * self.dtype.itemsize


@dataclass(frozen=True)
class _Entry:
    """One tensor of the file: a single array, or the 1-D pieces of a split big parameter."""

    shape: tuple[int, ...]
    dtype: np.dtype
    pieces: tuple[_StoredArray, ...]


class PdparamsFile(OpenTensorFile):
    """A `.pdparams` file opened lazily: the pickle is scanned once, tensor bytes stay on disk."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stream: BinaryIO = open(self.path, "rb")
        try:
            root = scan_pickle(self._stream, self.path.name, PDPARAMS_GLOBALS)
            self._entries = _collect_entries(root, self.path.name)
        except BaseException:
            self._stream.close()
            raise

    def tensors(self) -> dict[str, TensorMeta]:
        """Every tensor in file order; uint16 arrays are reported as "uint16"."""
        return {
            name: TensorMeta(name, logical_dtype(entry.dtype), entry.shape, shard=self.path.name)
            for name, entry in self._entries.items()
        }

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """One tensor as a C-contiguous array in its storage dtype (into `out` if given)."""
        entry = self._entries[name]
        where = f"{self.path.name}: tensor {name!r}"
        first = entry.pieces[0]
        # an unsplit array of two or more dimensions stored in another order has axes: read, then reorder
        reorder = first.axes is not None
        array = output_array(first.stored_shape if reorder else entry.shape, entry.dtype, None if reorder else out)
        raw = array.reshape(-1).view(np.uint8)
        position = 0
        for piece in entry.pieces:
            read_span_into(self._stream, piece.data, raw[position : position + piece.nbytes], where)
            position += piece.nbytes
        if not reorder:
            return array
        result = output_array(entry.shape, entry.dtype, out)
        np.copyto(result, array.transpose(first.axes))
        return result

    def stored_bytes(self, name: str) -> StoredBytes | None:
        """Where one tensor's bytes lie, when one plain C-ordered payload holds them."""
        pieces = self._entries[name].pieces
        if len(pieces) != 1:
            return None
        piece = pieces[0]
        if piece.axes is not None or not isinstance(piece.data, FileSpan) or piece.data.utf8_latin1:
            return None
        return StoredBytes(self.path, piece.data.offset, piece.data.length)


def _collect_entries(root: Any, where: str) -> dict[str, _Entry]:
    if not isinstance(root, dict):
        raise CorruptCheckpoint(f"{where}: a pdparams file must hold a dict of arrays, found {_kind(root)}")
    arrays: dict[str, _StoredArray] = {}
    split_info: Any = {}
    for key, value in root.items():
        if not isinstance(key, str):
            raise CorruptCheckpoint(f"{where}: tensor names must be strings, found {type(key).__name__}")
        if key == NAME_TABLE_KEY:
            continue
        if key == SPLIT_INFO_KEY:
            split_info = value
            continue
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
            value = value[1]  # paddle 2.1 stored (tensor name, ndarray)
        arrays[key] = _parse_array(value, f"{where}: tensor {key!r}")
    return _join_split_pieces(arrays, split_info, where)


def _join_split_pieces(arrays: dict[str, _StoredArray], split_info: Any, where: str) -> dict[str, _Entry]:
    """Present each `UnpackBigParamInfor@@` split (pieces `key@@.0`, `key@@.1`, …) as its original tensor."""
    if not isinstance(split_info, dict):
        raise CorruptCheckpoint(f"{where}: {SPLIT_INFO_KEY} is not a dict")
    split_at_first_piece: dict[str, tuple[str, _Entry]] = {}
    used_pieces: set[str] = set()
    for name, info in split_info.items():
        context = f"{where}: split tensor {name!r}"
        if not isinstance(name, str) or not isinstance(info, dict):
            raise CorruptCheckpoint(f"{context}: malformed {SPLIT_INFO_KEY} entry")
        shape = checked_shape(info.get("OriginShape"), context)
        piece_names = info.get("slices")
        if not isinstance(piece_names, list | tuple) or not piece_names:
            raise CorruptCheckpoint(f"{context}: 'slices' must list the piece names")
        pieces = []
        for piece_name in piece_names:
            if not isinstance(piece_name, str) or piece_name not in arrays or piece_name in used_pieces:
                raise CorruptCheckpoint(f"{context}: piece {piece_name!r} is missing")
            used_pieces.add(piece_name)
            pieces.append(arrays[piece_name])
        if any(len(p.shape) != 1 or p.dtype != pieces[0].dtype for p in pieces):
            raise CorruptCheckpoint(f"{context}: pieces must be 1-D arrays of one dtype")
        if sum(p.shape[0] for p in pieces) != math.prod(shape):
            raise CorruptCheckpoint(f"{context}: pieces do not add up to shape {shape}")
        split_at_first_piece[piece_names[0]] = (name, _Entry(shape, pieces[0].dtype, tuple(pieces)))
    entries: dict[str, _Entry] = {}
    for key, array in arrays.items():
        if key in split_at_first_piece:
            name, entry = split_at_first_piece[key]
            entries[name] = entry
        elif key not in used_pieces:
            entries[key] = _Entry(array.shape, array.dtype, (array,))
    return entries


def _parse_array(value: Any, where: str) -> _StoredArray:
    """Read numpy's reduce of one ndarray (`_reconstruct` + BUILD state, or protocol-5 `_frombuffer`)."""
    if isinstance(value, Reduced) and value.func.qualname in _RECONSTRUCT:
        return _parse_reconstruct(value, where)
    if isinstance(value, Reduced) and value.func.qualname in _FROMBUFFER:
        return _parse_frombuffer(value, where)
    raise CorruptCheckpoint(f"{where}: expected a numpy array, found {_kind(value)}")


def _parse_reconstruct(value: Reduced, where: str) -> _StoredArray:
    args = value.args
    if not args or args[0] != Global("numpy", "ndarray") or not value.built:
        raise CorruptCheckpoint(f"{where}: not a plain numpy ndarray")
    state = value.state
    if isinstance(state, tuple) and len(state) == 5:
        state = state[1:]  # drop the state version; older numpy pickles have none
    if not isinstance(state, tuple) or len(state) != 4 or not isinstance(state[2], bool):
        raise CorruptCheckpoint(f"{where}: malformed ndarray state")
    shape, dtype, fortran, data = state
    shape = checked_shape(shape, where)
    if fortran:
        return _stored_array(_dtype(dtype, where), shape[::-1], _reversed_axes(shape), data, where)
    return _stored_array(_dtype(dtype, where), shape, None, data, where)


def _parse_frombuffer(value: Reduced, where: str) -> _StoredArray:
    args = value.args
    if len(args) == 4:
        args = (*args, None)
    if len(args) != 5 or value.built:
        raise CorruptCheckpoint(f"{where}: malformed numpy _frombuffer call")
    data, dtype, shape, order, axis_order = args
    shape = checked_shape(shape, where)
    dtype = _dtype(dtype, where)
    if order == "C" or (order == "K" and axis_order is None):
        return _stored_array(dtype, shape, None, data, where)
    if order == "F":
        return _stored_array(dtype, shape[::-1], _reversed_axes(shape), data, where)
    if order == "K":
        axes = checked_shape(axis_order, where)
        if sorted(axes) != list(range(len(shape))):
            raise CorruptCheckpoint(f"{where}: malformed numpy axis order")
        return _stored_array(dtype, shape, axes, data, where)
    raise CorruptCheckpoint(f"{where}: unsupported array order {order!r}")


def _reversed_axes(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(reversed(range(len(shape))))


def _stored_array(
    dtype: np.dtype, stored_shape: tuple[int, ...], axes: tuple[int, ...] | None, data: Any, where: str
) -> _StoredArray:
    """A checked `_StoredArray`; permuting fewer than two axes changes nothing, so such `axes` are dropped."""
    array = _StoredArray(dtype, stored_shape, axes if len(stored_shape) > 1 else None, data)
    if isinstance(data, bytes):
        fits = len(data) == array.nbytes
    elif isinstance(data, FileSpan):
        fits = data.may_hold(array.nbytes)
    else:
        raise CorruptCheckpoint(f"{where}: array data is {_kind(data)}, not bytes")
    if not fits:
        raise CorruptCheckpoint(f"{where}: data size does not match shape {array.shape} of {array.dtype}")
    return array


def _dtype(value: Any, where: str) -> np.dtype:
    """Read numpy's reduce of a dtype: `dtype(code, False, True)` + BUILD `(3, byteorder, …)`."""
    if not (isinstance(value, Reduced) and value.func == Global("numpy", "dtype") and value.built):
        raise CorruptCheckpoint(f"{where}: malformed array dtype")
    args, state = value.args, value.state
    if not args or not isinstance(args[0], str) or not isinstance(state, tuple) or len(state) < 5:
        raise CorruptCheckpoint(f"{where}: malformed array dtype")
    code, byteorder = args[0], state[1]
    if code not in _TYPE_CODES or any(part is not None for part in state[2:5]):
        raise CorruptCheckpoint(f"{where}: unsupported array dtype {code!r}")
    if byteorder == ">":
        raise CorruptCheckpoint(f"{where}: big-endian arrays are not supported; re-save the file little-endian")
    if byteorder not in ("<", "|", "="):
        raise CorruptCheckpoint(f"{where}: malformed array dtype byte order")
    return np.dtype("<" + code)


def _kind(value: Any) -> str:
    if isinstance(value, Reduced):
        return f"a call to {value.func.qualname}"
    return f"a {type(value).__name__}"


class PdparamsShardWriter:
    """Writes a protocol-4 `.pdparams` pickle entry by entry; each payload goes straight from the array.

    bfloat16 tensors are written as uint16 (Paddle's convention); `metadata` is ignored.
    """

    def __init__(
        self, stream: BinaryIO, tensors: Sequence[TensorMeta], metadata: Mapping[str, str] | None = None
    ) -> None:
        self._emit = PickleEmitter(stream, protocol=4)
        self._emit.empty_dict()
        # the module numpy itself pickles `_reconstruct` under: numpy._core on 2.x, numpy.core on 1.x
        self._reconstruct_module = np.empty(0).__reduce__()[0].__module__

    def write(self, meta: TensorMeta, array: TensorData) -> None:
        storage = dtype_info(meta.dtype).storage
        emit = self._emit
        emit.text(meta.name)
        emit.global_ref(self._reconstruct_module, "_reconstruct")
        emit.mark()
        emit.global_ref("numpy", "ndarray")
        emit.value((0,))
        emit.value(b"b")
        emit.tuple_from_mark()
        emit.reduce()
        emit.mark()
        emit.values(1, tuple(meta.shape))
        emit.global_ref("numpy", "dtype")
        emit.value((storage.str[1:], False, True))
        emit.reduce()
        emit.value((3, storage.str[0], None, None, None, -1, -1, 0))
        emit.build()
        emit.value(False)
        emit.bytes_header(meta.nbytes)
        write_array(emit.stream, meta, array)
        emit.tuple_from_mark()
        emit.build()
        emit.setitem()

    def finish(self) -> None:
        self._emit.stop()

