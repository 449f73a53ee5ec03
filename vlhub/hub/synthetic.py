"""Checkpoints with deterministic random weights in a family's official layout.

The built-in tiny models and the full-size benchmark checkpoints are both made here. Each tensor's
values depend only on its name and the seed, never on write order, so any subset can be recreated.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vlhub.family_registry import Family
from vlhub.formats.tensors import TensorMeta, bf16_bits_from_float32, dtype_info
from vlhub.formats.writers import CheckpointWriter, write_json_atomic
from vlhub.keymaps import Layout

# the key-map kind of a norm weight stored as its scale minus one (Qwen3.5's `1 + w` RMSNorms)
ZERO_CENTRED_NORM = "zero_centred_norm"


def synthetic_values(name: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """float32 values for one tensor, scaled so a forward pass stays well conditioned.

    Norm weights sit near 1, biases near 0, embeddings are unit normal and other weights (each expert of a fused
    expert tensor too) have variance 1/fan_in, so logits differ clearly and greedy decoding is not a coin toss.
    """
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    values = rng.standard_normal(shape, dtype=np.float32)
    if len(shape) == 1:
        values *= 0.1
        if not name.endswith("bias"):
            values += 1.0
    elif len(shape) == 3:  # fused experts [experts, in, out] in the official layout: each expert's fan-in
        values *= 1 / math.sqrt(shape[1])
    elif not name.endswith(("embed_tokens.weight", "wte.weight")):
        values *= 1 / math.sqrt(math.prod(shape[1:]))
    return values


def cast_float32(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values in a float dtype's storage (bfloat16 as rounded uint16 bits)."""
    if dtype == "bfloat16":
        return bf16_bits_from_float32(values)
    return values.astype(dtype_info(dtype).storage)


def write_synthetic_checkpoint(
    out_dir: Path,
    family: Family,
    config: dict,
    *,
    format: str | None = None,
    dtype: str = "bfloat16",
    max_shard_size: int | None = None,
    seed: int = 0,
    on_bytes: Callable[[int], None] | None = None,
    layout: Layout | None = None,
) -> Path:
    """Write config.json, generation_config.json (and preprocessor_config.json where the family gives one) and
    random weights for every official tensor (and the key map's `[release_extras]`, which conversions drop), in the official layout or in `layout` (one of the family's: its
    names, its kinds stored transposed; the values are the official ones either way)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fmt = format or family.checkpoint_format
    expected = family.keymap.expected(config) + family.keymap.extras(config)
    stored = {t.name: layout is not None and layout.transposes(t.kind) for t in expected}
    names = {t.name: layout.from_official(t.name) if layout is not None else t.name for t in expected}
    tensors = [TensorMeta(names[t.name], dtype,
                          (*t.shape[:-2], t.shape[-1], t.shape[-2]) if stored[t.name] else t.shape)
               for t in expected]
    metadata = {"format": "pt"} if fmt == "safetensors" else None
    with CheckpointWriter(out_dir, fmt, tensors, max_shard_size=max_shard_size, metadata=metadata,
                          on_bytes=on_bytes) as writer:
        for official in expected:
            values = synthetic_values(official.name, official.shape, seed)
            if official.kind == ZERO_CENTRED_NORM:  # scales by 1 + w: stored near 0, so the scale is near 1
                values -= 1
            writer.write(names[official.name],
                         cast_float32(np.ascontiguousarray(values.swapaxes(-1, -2)) if stored[official.name]
                                      else values, dtype))
    write_json_atomic(out_dir / "generation_config.json", family.facts["generation"])
    if "processor" in family.facts:
        write_json_atomic(out_dir / "preprocessor_config.json", family.facts["processor"])
    # config.json last: its presence marks a complete checkpoint
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
