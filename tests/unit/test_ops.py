"""Casts and transposes against torch, the reference for rounding."""

from __future__ import annotations

import numpy as np
import pytest

from vlhub.convert.ops import Transpose, cast_float, swapped_shape, transpose_2d, transpose_last
from vlhub.errors import UserError
from vlhub.formats.tensors import bf16_bits_from_float32


def _tie_heavy_float32(n: int = 1 << 18) -> np.ndarray:
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    bits[: n // 2] &= 0xFFFF8000  # exactly halfway between two bfloat16 values: ties to even
    values = bits.view(np.float32)
    return values[np.isfinite(values) & (np.abs(values) < 6e4)]


def test_float32_to_bfloat16_and_float16_round_like_torch() -> None:
    torch = pytest.importorskip("torch")
    values = _tie_heavy_float32()
    reference = torch.from_numpy(values)
    assert np.array_equal(cast_float(values, "float32", "bfloat16"),
                          reference.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    assert np.array_equal(bf16_bits_from_float32(values),
                          reference.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    assert np.array_equal(cast_float(values, "float32", "float16"), reference.to(torch.float16).numpy())
    bf16 = cast_float(values, "float32", "bfloat16")
    from_bf16 = torch.from_numpy(bf16.view(np.int16)).view(torch.bfloat16)
    assert np.array_equal(cast_float(bf16, "bfloat16", "float16"), from_bf16.to(torch.float16).numpy())


def test_a_cast_that_would_overflow_is_refused() -> None:
    with pytest.raises(UserError, match="beyond float16's range"):
        cast_float(np.array([1e6, 1.0], np.float32), "float32", "float16")


def test_tiled_transpose_matches_numpy_on_ragged_shapes() -> None:
    array = np.arange(300 * 517, dtype=np.uint16).reshape(300, 517)
    assert np.array_equal(transpose_2d(array), array.T)


def test_expert_tensors_transpose_expert_by_expert() -> None:
    """A fused expert tensor [experts, a, b] becomes [experts, b, a]: each expert's matrix transposed, in order."""
    array = np.arange(5 * 300 * 7, dtype=np.float32).reshape(5, 300, 7)
    assert np.array_equal(transpose_last(array), array.transpose(0, 2, 1))
    assert Transpose.shape((5, 300, 7)) == swapped_shape((5, 300, 7)) == (5, 7, 300)
    assert np.array_equal(Transpose.apply(Transpose.apply(array)), array)  # its own inverse
