"""Run a conversion plan: read, transform and write tensor by tensor, with bounded memory.

Three stages overlap on the two cores: a reader thread reads tensors ahead, the calling thread
transposes and casts, a writer thread writes (and hashes). Every buffer comes from one `BufferBudget`:
reserved before a tensor is read, for the tensor and the copies its ops make, so memory stays under
the budget (spares included) whatever the number of layers, and the stages cannot starve each other.

Buffers are recycled: every layer has the same shapes, so the buffer one tensor was read into or
written from serves the next tensor of that size. Fresh memory costs a page fault per page; on this
project's machines that made a 7B conversion a third slower.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterator

import numpy as np

from vlhub.convert.ops import cast_float, swapped_shape, transpose_2d, transpose_last
from vlhub.convert.plan import Plan, Step
from vlhub.formats.io_utils import StoredBytes, output_array
from vlhub.formats.readers import Checkpoint
from vlhub.formats.tensors import dtype_info
from vlhub.formats.writers import CheckpointWriter


def ordered_steps(plan: Plan, checkpoint: Checkpoint) -> list[Step]:
    """Steps in source order (shard by shard, as each file lays them out), so every read is sequential."""
    shard_order = {shard: i for i, shard in enumerate(checkpoint.shards)}
    file_order = {name: i for i, name in enumerate(checkpoint.tensors)}
    return sorted(plan.steps, key=lambda s: (shard_order[s.first_stored.shard], file_order[s.first_stored.name]))


def read_source(checkpoint: Checkpoint, step: Step, out: np.ndarray | None = None) -> np.ndarray:
    """The step's source tensor in its storage dtype (into `out` if given): read whole, or joined from its parts
    one at a time, each part's [out, in] matrix transposed into its columns of its entry (the "fuse" op)."""
    if not step.parts:
        return checkpoint.read(step.source.name, out)
    out = output_array(step.source.shape, dtype_info(step.source.dtype).storage, out)
    entries, _, columns = step.source.shape
    count = len(step.parts) // entries
    width = columns // count
    for number, part in enumerate(step.parts):
        entry, column = divmod(number, count)
        out[entry, :, column * width:(column + 1) * width] = transpose_2d(checkpoint.read(part.name))
    return out


def buffer_cost(step: Step) -> int:
    """Bytes a step holds at its peak: the tensor as read plus the copy each op makes."""
    cost = step.source.nbytes
    if step.transpose:
        cost += step.source.nbytes
    if step.source.dtype != step.target.dtype:
        cost += step.target.nbytes
    return cost


class BufferBudget:
    """Tensor buffers for one conversion: reserved, recycled by size, never more than `limit` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._reserved = 0
        self._spares: dict[int, list[np.ndarray]] = {}
        self._spare_bytes = 0
        self._failed = False
        self._cond = threading.Condition()

    def reserve(self, nbytes: int) -> None:
        """Wait until `nbytes` fit (a tensor larger than the budget goes alone), then hold them."""
        with self._cond:
            self._cond.wait_for(lambda: self._failed or not self._reserved or self._reserved + nbytes <= self.limit)
            self._reserved += nbytes
            while self._spares and self._reserved + self._spare_bytes > self.limit:
                self._drop_a_spare()

    def array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A buffer inside the current reservation: a spare of the same size if there is one."""
        nbytes = math.prod(shape) * dtype.itemsize
        with self._cond:
            if nbytes in self._spares:
                return self._take_spare(nbytes).view(dtype).reshape(shape)
        return np.empty(shape, dtype=dtype)

    def release(self, array: np.ndarray) -> None:
        """The buffer is done with: its bytes leave the reservation and it becomes a spare if it fits."""
        flat = array.reshape(-1).view(np.uint8)
        with self._cond:
            self._reserved -= flat.nbytes
            if self._reserved + self._spare_bytes + flat.nbytes <= self.limit:
                self._spares.setdefault(flat.nbytes, []).append(flat)
                self._spare_bytes += flat.nbytes
            self._cond.notify_all()

    def fail(self) -> None:
        with self._cond:
            self._failed = True
            self._cond.notify_all()

    def _drop_a_spare(self) -> None:
        self._take_spare(next(iter(self._spares)))

    def _take_spare(self, nbytes: int) -> np.ndarray:
        spares = self._spares[nbytes]
        spare = spares.pop()
        if not spares:
            del self._spares[nbytes]
        self._spare_bytes -= nbytes
        return spare


def transform(step: Step, array: np.ndarray, budget: BufferBudget) -> np.ndarray:
    """Apply a step's transpose and cast, handing each consumed buffer back to the budget."""
    if step.transpose:
        transposed = transpose_last(array, budget.array(swapped_shape(array.shape), array.dtype))
        budget.release(array)
        array = transposed
    if step.source.dtype != step.target.dtype:
        cast = cast_float(array, step.source.dtype, step.target.dtype,
                          budget.array(step.target.shape, dtype_info(step.target.dtype).storage))
        budget.release(array)
        array = cast
    return array


_DONE = object()


class _Stage:
    """A thread that runs `body` over the items of a queue and puts results on the next one."""

    def __init__(self, name: str, body: Callable[[], None], errors: list[BaseException], budget: BufferBudget):
        def run() -> None:
            try:
                body()
            except BaseException as exc:  # handed to the calling thread, which re-raises it
                errors.append(exc)
                budget.fail()

        self.thread = threading.Thread(target=run, name=name, daemon=True)
        self.thread.start()


def run_plan(plan: Plan, checkpoint: Checkpoint, writer: CheckpointWriter, *, memory_budget: int) -> None:
    """Write every step of `plan` through `writer` (whose tensor order must be `ordered_steps`)."""
    budget = BufferBudget(memory_budget)
    errors: list[BaseException] = []
    stop = threading.Event()
    read_queue: queue.Queue = queue.Queue()
    write_queue: queue.Queue = queue.Queue()

    def read_ahead() -> None:
        try:
            for step in ordered_steps(plan, checkpoint):
                if stop.is_set():
                    return
                stored = checkpoint.stored_bytes(step.source.name) if step.copies_bytes else None
                if stored is not None:
                    read_queue.put((step, stored))
                    continue
                budget.reserve(buffer_cost(step))
                if stop.is_set():
                    return
                source = dtype_info(step.source.dtype).storage
                read_queue.put((step, read_source(checkpoint, step, budget.array(step.source.shape, source))))
        finally:
            read_queue.put(_DONE)

    def write_all() -> None:
        for name, data in _until_done(write_queue):
            if not stop.is_set():
                writer.write(name, data)
            if not isinstance(data, StoredBytes):
                budget.release(data)

    reader = _Stage("vlhub-reader", read_ahead, errors, budget)
    writing = _Stage("vlhub-writer", write_all, errors, budget)
    try:
        for step, data in _until_done(read_queue):
            if errors:
                break
            if not isinstance(data, StoredBytes):
                data = transform(step, data, budget)
            write_queue.put((step.target.name, data))
    except BaseException:
        stop.set()  # the other stages drop their work instead of finishing a doomed output
        budget.fail()
        raise
    finally:
        write_queue.put(_DONE)
        if errors:
            stop.set()
            budget.fail()
        writing.thread.join()
        stop.set()
        budget.fail()
        _drain(read_queue)
        reader.thread.join()
    if errors:
        raise errors[0]


def _until_done(items: queue.Queue) -> Iterator:
    while (item := items.get()) is not _DONE:
        yield item


def _drain(items: queue.Queue) -> None:
    while True:
        try:
            items.get_nowait()
        except queue.Empty:
            return
