"""Run a conversion plan: read, transform and write tensor by tensor, with bounded memory.

Reading and transposing happen on the calling thread, writing (and hashing) on a writer thread, so the
two cores overlap compute and disk. Tensors waiting to be written are capped at `memory_budget` bytes:
peak memory stays near budget + one tensor being transformed, whatever the number of layers.
"""

from __future__ import annotations

import queue
import threading
import numpy as np

from vlhub.converters.io_utils import TensorData
from vlhub.converters.ops import cast_float, transpose_2d
from vlhub.converters.plan import Plan, Step
from vlhub.converters.readers import Checkpoint
from vlhub.converters.writers import CheckpointWriter


def ordered_steps(plan: Plan, checkpoint: Checkpoint) -> list[Step]:
    """Steps in source order (shard by shard, as each file lays them out), so every read is sequential."""
    shard_order = {shard: i for i, shard in enumerate(checkpoint.shards)}
    file_order = {name: i for i, name in enumerate(checkpoint.tensors)}
    return sorted(plan.steps, key=lambda s: (shard_order[s.source.shard], file_order[s.source.name]))


def produce(step: Step, checkpoint: Checkpoint) -> TensorData:
    """The output bytes of one step: copied from the file when untouched, else read and transformed."""
    if step.copies_bytes:
        stored = checkpoint.stored_bytes(step.source.name)
        if stored is not None:
            return stored
    array: np.ndarray = checkpoint.read(step.source.name)
    if step.transpose:
        array = transpose_2d(array)
    if step.source.dtype != step.target.dtype:
        array = cast_float(array, step.source.dtype, step.target.dtype)
    return array


class _Budget:
    """Bytes handed to the writer and not yet written; the producer waits while over budget."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self.failed = False
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cond:
            # a tensor larger than the budget still goes, alone
            self._cond.wait_for(lambda: self.failed or self.in_flight == 0 or self.in_flight + n <= self.limit)
            self.in_flight += n

    def release(self, n: int) -> None:
        with self._cond:
            self.in_flight -= n
            self._cond.notify_all()

    def fail(self) -> None:
        with self._cond:
            self.failed = True
            self._cond.notify_all()


def run_plan(plan: Plan, checkpoint: Checkpoint, writer: CheckpointWriter, *, memory_budget: int) -> None:
    """Write every step of `plan` through `writer` (whose tensor order must be `ordered_steps`)."""
    budget = _Budget(memory_budget)
    work: queue.Queue[tuple[str, TensorData, int] | None] = queue.Queue()
    errors: list[BaseException] = []
    abandoned = threading.Event()

    def write_all() -> None:
        try:
            while (item := work.get()) is not None:
                name, data, cost = item
                if not abandoned.is_set():
                    writer.write(name, data)
                budget.release(cost)
        except BaseException as exc:  # handed to the producer, which re-raises it
            errors.append(exc)
            budget.fail()

    thread = threading.Thread(target=write_all, name="vlhub-writer", daemon=True)
    thread.start()
    try:
        for step in ordered_steps(plan, checkpoint):
            cost = 0 if step.copies_bytes else step.target.nbytes
            budget.acquire(cost)
            if errors:
                break
            work.put((step.target.name, produce(step, checkpoint), cost))
    except BaseException:
        abandoned.set()  # the writer drops what is queued instead of finishing a doomed output
        raise
    finally:
        work.put(None)
        thread.join()
    if errors:
        raise errors[0]
