"""A checkpoint's tensors by official name, as float32 in torch orientation, read one at a time.

Whatever layout the checkpoint is in (official, transformers 5, PaddleMIX), the key map's plan says
where each official tensor is stored and whether it is transposed; `ModelWeights.get` undoes both.
Streamed (the default), nothing is kept: a forward that asks for one layer's tensors, uses them and
drops them holds one layer at a time. Resident, decoded tensors are kept for the next pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vlhub.convert.configs import official_config
from vlhub.convert.ops import transpose_2d, transpose_last
from vlhub.convert.pipeline import read_source
from vlhub.convert.plan import Step, plan_conversion
from vlhub.formats.readers import Checkpoint, open_checkpoint
from vlhub.formats.tensors import TensorMeta, float32_values

_FLOAT32_BYTES = 4


class ModelWeights:
    """Lazy, decoded access to one checkpoint's tensors under their official names."""

    def __init__(self, checkpoint: Checkpoint, *, resident: bool = False) -> None:
        self.checkpoint = checkpoint
        self.plan = plan_conversion(checkpoint.tensors, checkpoint.config, target_layout="official")
        self.config = official_config(checkpoint.config or {})
        self.family = self.plan.family
        self.resident = resident
        self._steps: dict[str, Step] = {step.target.name: step for step in self.plan.steps}
        self._kept: dict[str, np.ndarray] = {}

    @classmethod
    def open(cls, path: Path | str, *, resident: bool = False) -> ModelWeights:
        checkpoint = open_checkpoint(path)
        try:
            return cls(checkpoint, resident=resident)
        except BaseException:
            checkpoint.close()
            raise

    @property
    def float32_bytes(self) -> int:
        """What every tensor takes decoded to float32 (what a resident forward keeps)."""
        return sum(step.source.numel for step in self.plan.steps) * _FLOAT32_BYTES

    def has(self, name: str) -> bool:
        return name in self._steps

    def stored_dtype(self, name: str) -> str:
        return self._steps[name].source.dtype

    def get(self, name: str) -> np.ndarray:
        """One official tensor as float32, torch orientation ([out, in] for Linear weights)."""
        kept = self._kept.get(name)
        if kept is not None:
            return kept
        step = self._steps[name]
        values = float32_values(read_source(self.checkpoint, step), step.source.dtype)
        if step.transpose:
            values = transpose_last(values)
        if self.resident:
            self._kept[name] = values
        return values

    def entry(self, name: str, index: int) -> np.ndarray:
        """Entry `index` along the first axis of an official tensor (one expert of a fused expert tensor) as
        float32 in the official orientation, reading only that entry: a 235B-A22B layer's 128 experts are
        never in memory together."""
        if self.resident:
            return self.get(name)[index]
        step = self._steps[name]
        if step.parts:  # the entry's own parts, joined
            count = len(step.parts) // step.source.shape[0]
            one = Step(TensorMeta(name, step.source.dtype, (1, *step.source.shape[1:])), step.target, step.ops,
                       step.parts[index * count:(index + 1) * count])
            values = read_source(self.checkpoint, one)[0]
        else:
            values = self.checkpoint.read_rows(step.source.name, np.array([index]))[0]
        values = float32_values(values, step.source.dtype)
        return transpose_2d(values) if step.transpose else values

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` of an embedding table ([len(ids), hidden] float32), reading only those rows."""
        step = self._steps[name]
        if self.resident or step.transpose:
            return self.get(name)[ids]
        return float32_values(self.checkpoint.read_rows(step.source.name, ids), step.source.dtype)

    def row_blocks(self, name: str, size: int) -> Iterator[tuple[int, np.ndarray]]:
        """A 2-D official tensor `size` rows at a time as (first row, float32 block): an lm_head
        of 152064 x 3584 never sits in memory whole."""
        if self.resident:
            whole = self.get(name)
            for start in range(0, whole.shape[0], size):
                yield start, whole[start:start + size]
            return
        step = self._steps[name]
        axis = 1 if step.transpose else 0  # official rows are stored columns when transposed
        start = 0
        for block in self.checkpoint.iter_blocks(step.source.name, size, axis=axis):
            values = float32_values(block, step.source.dtype)
            yield start, transpose_2d(values) if step.transpose else values
            start += values.shape[1 if step.transpose else 0]

    def close(self) -> None:
        self._kept.clear()
        self.checkpoint.close()

    def __enter__(self) -> ModelWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
