"""A checkpoint's tensors by official name, as float32 in torch orientation, read one at a time.

Whatever layout the checkpoint is in (official, transformers 5, PaddleMIX), the key map's plan says
where each official tensor is stored and whether it is transposed; `ModelWeights.get` undoes both.
Streamed (the default), nothing is kept: a forward that asks for one layer's tensors, uses them and
drops them holds one layer at a time. Resident, decoded tensors are kept for the next pass.

Tensors are mapped from the page cache rather than copied (`MappedTensors`, which also has the next layer
read from disk while this one computes), and a Linear weight is applied by `linear` a block of decoded rows
at a time on every core (`products`): a streamed pass costs about its read.
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from vlhub.convert.configs import official_config
from vlhub.convert.ops import transpose_2d, transpose_last
from vlhub.convert.pipeline import read_source
from vlhub.convert.plan import Step, plan_conversion
from vlhub.errors import CorruptCheckpoint
from vlhub.formats.io_utils import StoredBytes
from vlhub.formats.readers import Checkpoint, open_checkpoint
from vlhub.formats.tensors import TensorMeta, dtype_info, float32_values

_FLOAT32_BYTES = 4
# rows of a weight decoded to float32 at a time by `ModelWeights.linear`: a block small enough to stay in cache
# between its decoding and its product, and to come from the allocator's reused memory rather than fresh pages
_LINEAR_BLOCK_BYTES = 2 << 20
# a Linear weight larger than this (stored) is read a block of `_TABLE_ROWS` rows at a time: an lm_head
_WHOLE_BYTES = 256 << 20
_TABLE_ROWS = 16384
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
# the threads `products` shares its blocks with (besides the caller's): started when first used
_POOL = ThreadPoolExecutor(max(1, _CORES - 1), thread_name_prefix="vlhub-products")
# a numbered group of tensors: a decoder layer (`model.layers.3.`), a vision block (`visual.blocks.3.`)
_GROUP = re.compile(r"^(.*?\.)(\d+)\.")
_NUMBERED = re.compile(r"(^|\.)\d+\.")


class MappedTensors:
    """A checkpoint's tensors in their storage dtype as read-only views of the page cache (mmap): nothing is
    copied, and no fresh memory is faulted in for them. Asked for a tensor of a numbered group
    (`model.layers.3.`), it has the kernel read the next group's bytes into the page cache on a thread of its
    own, so the disk works while the caller computes on this one.

    `names` maps the names the caller asks for to the checkpoint's. A tensor whose bytes are not stored plainly
    in one span (a pickle's split or encoded payload) is read as the checkpoint reads it."""

    def __init__(self, checkpoint: Checkpoint, names: dict[str, str]) -> None:
        self.checkpoint = checkpoint
        self._names = names
        self._groups: dict[str, list[str]] = {}
        for name in names:
            found = _GROUP.match(name)
            if found and _read_whole(name[found.end():], checkpoint.tensors[names[name]]):
                self._groups.setdefault(found.group(0), []).append(name)
        self._spans: dict[str, StoredBytes | None] = {}
        self._group: str | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="vlhub-read-ahead")

    def read(self, name: str) -> np.ndarray:
        """One tensor (the caller's name) in its storage dtype; read-only when mapped."""
        found = _GROUP.match(name)
        if found and found.group(0) != self._group:  # the first tensor asked of a group: the next one is wanted
            self._group = found.group(0)
            following = [self._span(n) for n in self._groups.get(f"{found.group(1)}{int(found.group(2)) + 1}.", [])]
            self._thread.submit(self._want, [span for span in following if span is not None])
        span = self._span(name)
        stored = self._names[name]
        if span is None:
            return self.checkpoint.read(stored)
        meta = self.checkpoint.tensors[stored]
        return _mapping(span).view(dtype_info(meta.dtype).storage).reshape(meta.shape)

    def _span(self, name: str) -> StoredBytes | None:
        if name not in self._spans:  # asked of the checkpoint on this thread only: it has one open file
            span = self.checkpoint.stored_bytes(self._names[name])
            self._spans[name] = span if span is not None and span.length else None
        return self._spans[name]

    def close(self) -> None:
        """Stop reading ahead."""
        self._thread.shutdown(wait=True, cancel_futures=True)

    def _want(self, spans: list[StoredBytes]) -> None:
        # one byte of every page read here, on this thread, has the disk fill the page cache; posix_fadvise and
        # madvise WILLNEED were measured to start nothing on this project's machine
        for span in spans:
            view = _mapping(span)
            int(view[::mmap.PAGESIZE].max())


def _read_whole(rest: str, meta: TensorMeta) -> bool:
    """Whether a group's tensor is used whole, so worth reading ahead: not a mixture's experts, which are read one
    chosen expert at a time (stacked [experts, ., .], or one numbered entry each: `mlp.experts.17.`)."""
    return len(meta.shape) < 3 and not _NUMBERED.search(rest)


def _mapping(span: StoredBytes) -> np.ndarray:
    """The bytes of `span`, mapped read-only (unmapped when the array goes)."""
    start = span.offset - span.offset % mmap.ALLOCATIONGRANULARITY
    with open(span.path, "rb") as file:
        missing = span.offset + span.length - os.fstat(file.fileno()).st_size
        if missing > 0:  # mmap would refuse it with a bare ValueError
            raise CorruptCheckpoint(f"{span.path}: file ends {missing} bytes early: it is truncated")
        region = mmap.mmap(file.fileno(), span.offset + span.length - start, offset=start, access=mmap.ACCESS_READ)
    return np.frombuffer(region, np.uint8, span.length, span.offset - start)


def products(x: np.ndarray, stored: np.ndarray, dtype: str) -> np.ndarray:
    """x @ W.T for a 2-D weight W stored as `stored` in `dtype` ([out, in]), float32 [..., out]: rows of W are
    decoded a few MB at a time and multiplied at once, the blocks split between the cores' threads, each
    product on one core (`one_blas_thread`; BLAS's own threads would fight them for the same cores)."""
    out = np.empty((*x.shape[:-1], stored.shape[0]), dtype=np.float32)
    rows = max(1, _LINEAR_BLOCK_BYTES // (_FLOAT32_BYTES * stored.shape[1]))
    starts = range(0, stored.shape[0], rows)

    def share(part: range) -> None:
        for start in part:
            block = float32_values(stored[start:start + rows], dtype)
            out[..., start:start + len(block)] = x @ block.T

    workers = max(1, min(_CORES, len(starts)))
    size = -(-len(starts) // workers)
    shares = [_POOL.submit(share, starts[i * size:(i + 1) * size]) for i in range(1, workers)]
    share(starts[:size])  # this thread takes the first share
    for done in shares:
        done.result()
    return out


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """numpy's BLAS (OpenBLAS, as numpy's wheels bundle it) on one thread while inside: `products` spreads the
    work over the cores itself. Measured on this project's 2-core machine, one token's products with four 7B
    decoder layers' weights (0.93 G values) took 3.8 s on OpenBLAS's two threads (each call waking the other
    and spinning) and 0.6 s this way.
    Nothing happens where the BLAS is not found (another build, another OS)."""
    setter, getter = _openblas_threads()
    if setter is None or getter is None:
        yield
        return
    before = getter()
    setter(1)
    try:
        yield
    finally:
        setter(before)


def _openblas_threads() -> tuple[Callable[[int], None] | None, Callable[[], int] | None]:
    """OpenBLAS's set/get thread-count functions in a library this process has loaded, if any."""
    try:
        with open("/proc/self/maps") as maps:
            libraries = {line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line}
    except OSError:
        return None, None
    for library in sorted(libraries):
        try:
            handle = ctypes.CDLL(library)
        except OSError:
            continue
        for prefix, suffix in itertools.product(("scipy_", ""), ("64_", "")):
            setter = getattr(handle, f"{prefix}openblas_set_num_threads{suffix}", None)
            getter = getattr(handle, f"{prefix}openblas_get_num_threads{suffix}", None)
            if setter is not None and getter is not None:
                return setter, getter
    return None, None


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
        self._mapped = MappedTensors(checkpoint, {name: step.source.name for name, step in self._steps.items()
                                                  if not step.parts})

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
        values = float32_values(self._read(name), step.source.dtype)
        if step.transpose:
            values = transpose_last(values)
        if self.resident:
            self._kept[name] = values
        return values

    def linear(self, x: np.ndarray, name: str) -> np.ndarray:
        """x @ W.T for the official Linear weight `name` ([out, in]), float32 [..., out]. Streamed, the stored
        values are decoded a block of rows at a time, each block multiplied while it is in cache, the blocks
        shared between the cores (`products`): a 7B model's 28 GB of float32 weights are never written out,
        and a decode step costs little more than the read."""
        step = self._steps[name]
        large = step.source.nbytes > _WHOLE_BYTES
        if self.resident or name in self._kept or (step.transpose and not large):
            return x @ self.get(name).T
        if not large:
            return products(x, self._read(name), step.source.dtype)
        # a table (lm_head), read a block of rows at a time: memory does not grow with the vocabulary
        out = np.empty((*x.shape[:-1], step.target.shape[0]), dtype=np.float32)
        if step.transpose:
            for start, block in self.row_blocks(name, _TABLE_ROWS):
                out[..., start:start + len(block)] = x @ block.T
            return out
        start = 0
        for block in self.checkpoint.iter_blocks(step.source.name, _TABLE_ROWS):
            out[..., start:start + len(block)] = products(x, block, step.source.dtype)
            start += len(block)
        return out

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

    def _read(self, name: str) -> np.ndarray:
        """An official tensor as stored (its dtype, its orientation)."""
        step = self._steps[name]
        return read_source(self.checkpoint, step) if step.parts else self._mapped.read(name)

    def close(self) -> None:
        self._kept.clear()
        self._mapped.close()
        self.checkpoint.close()

    def __enter__(self) -> ModelWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
