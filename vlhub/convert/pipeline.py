"""Run a conversion plan: read, transform and write tensor by tensor, with bounded memory.

Three stages overlap on the two cores: a reader thread reads tensors ahead, the calling thread
transposes and casts, a writer thread writes (and hashes). Every buffer comes from a `BufferBudget`:
reserved before a tensor is read, for the tensor and the copies its ops make, so memory stays under
the budget (spares included) whatever the number of layers. The blocks of a tiled tensor (below) have
buffers of their own, so the reader, holding its budget for the tensors after a tiled one, cannot stall them.

Buffers are recycled: every layer has the same shapes, so the buffer one tensor was read into or
written from serves the next tensor of that size. Fresh memory costs a page fault per page; on this
project's machines that made a 7B conversion a third slower.

A step whose buffers would exceed `TILE_BYTES` (`lm_head`, the MLP weights) is tiled: its output is made in
consecutive blocks of the output's C order, and the writer streams them into the file (and its hash) in order. A
transposed block [c0:c1] is source columns c0:c1 of every source row, so the block needs the whole source: a
source of at most half the budget (a 7B's MLP weights, 136 MB) is read into a budget buffer, so one can be read
while another is tiled, and its blocks (16 MB) are transposed from memory; a larger one (an lm_head, a 72B's MLP
weights) is read into the page cache once, sequentially (at most 1 GB of them ahead), and each block (64 MB:
every block maps the whole tensor) is copied out of a memory map of the file, a window of source rows at a
time. A cast alone reads each block from the file. The peak therefore does not grow with the largest tensor.
Tensors a file does not store plainly in C order (pickled views) are still read whole.

A step joined from parts (a mixture's experts stored one entry each, joined into the official [experts, ., .]
tensor) is made one expert at a time: the reader joins an expert's parts into its slice of the output, already
in the output's orientation, and the writer streams the slices in order; memory holds a few experts, not the
tensor (at 397B-A17B one joined tensor is 8.6 GB).

Bytes stored plainly are read, and every file written, around the page cache where the filesystem allows it
(`direct_io`): on this project's machines the kernel's page-cache work was most of a conversion's CPU, and a
conversion reads and writes every byte once. Its buffers are mapped on their own (`direct_io.mapped_buffer`),
so a freed one leaves the process.
"""

from __future__ import annotations

import errno
import math
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from vlhub.convert.ops import cast_float, swapped_shape, transpose_2d, transpose_into, transpose_last
from vlhub.convert.plan import Plan, Step
from vlhub.errors import CorruptCheckpoint
from vlhub.formats import direct_io
from vlhub.formats.io_utils import Pieces, StoredBytes, output_array, read_exact_into
from vlhub.formats.readers import Checkpoint
from vlhub.formats.tensors import dtype_info
from vlhub.formats.writers import CheckpointWriter

# A step whose buffers would exceed this is tiled, in blocks of at most this. CPU time (user + system) to
# transpose a [152064, 3584] bf16 lm_head from the page cache, measured here: 2.2 s in 64 MB tiles, 1.65 s in
# 128 MB tiles, 3.1 s reading it whole (its 2.2 GB of fresh pages fault in): each block maps the whole tensor.
TILE_BYTES = 64 << 20
# a transposed block made from a source in memory needs no large tile: no mapping is repeated per block
_MEMORY_TILE_BYTES = 16 << 20
# windows of source rows mapped at a time (at most a tile): the mapped pages count as resident while mapped
_WINDOW_BYTES = 16 << 20
# The buffers read ahead: untiled tensors (each costs at most a tile, or it would be tiled), and the sources of
# tiled transposes read into memory, each at most half of this, so one can be read while another is tiled (a
# 7B's MLP weights, 136 MB, are; a 72B's, 484 MB, and lm_heads go through the page cache instead).
MEMORY_BUDGET = 280 << 20
# blocks of a tiled tensor in flight between the calling thread and the writer; buffers of their own, so a
# reader that has reserved its budget for the tensors after a tiled one cannot stall the tiling
_TILES_IN_FLIGHT = 2
# bytes of tiled tensors the reader may have read into the page cache before the calling thread has tiled them:
# page cache, not this process's memory, so the reader can keep the disk busy through a long transpose
_TILED_AHEAD_BYTES = 1 << 30
# bytes spliced to /dev/null (or read, where the kernel cannot splice) at a time, to bring a tiled tensor into the
# page cache
_CACHE_CHUNK = 64 << 20
# a block's cast starts at this alignment in its buffer, after the block
_ALIGN = 64


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
    for entry in range(step.source.shape[0]):
        read_joined_entry(checkpoint, step, entry, out[entry], transpose=False)
    return out


def joined_entry_shape(step: Step) -> tuple[int, ...]:
    """The shape of one entry (expert) of a joined step's output, before its cast."""
    _, rows, columns = step.source.shape
    return (columns, rows) if step.transpose else (rows, columns)


def read_joined_entry(checkpoint: Checkpoint, step: Step, entry: int, out: np.ndarray, *, transpose: bool) -> None:
    """Join entry `entry` of a step from its parts into `out`: the fused [rows, columns] slice, or with `transpose`
    its transpose, which is the parts stacked as stored (read straight into place, nothing transposed)."""
    count = len(step.parts) // step.source.shape[0]
    width = step.source.shape[2] // count
    for column, part in enumerate(step.parts[entry * count:(entry + 1) * count]):
        if transpose:
            checkpoint.read(part.name, out[column * width:(column + 1) * width])
        else:
            out[:, column * width:(column + 1) * width] = transpose_2d(checkpoint.read(part.name))


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
        return direct_io.mapped_buffer(nbytes).view(dtype).reshape(shape)

    def release(self, array: np.ndarray) -> None:
        """The buffer is done with: its bytes leave the reservation and it becomes a spare if it fits."""
        flat = array.reshape(-1).view(np.uint8)
        with self._cond:
            self._reserved -= flat.nbytes
            if self._reserved + self._spare_bytes + flat.nbytes <= self.limit:
                self._spares.setdefault(flat.nbytes, []).append(flat)
                self._spare_bytes += flat.nbytes
            self._cond.notify_all()

    def unreserve(self, nbytes: int) -> None:
        """Reserved bytes that were not buffers (a tensor read into the page cache ahead) are done with."""
        with self._cond:
            self._reserved -= nbytes
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


def is_tiled(step: Step, stored: StoredBytes | None, tile_bytes: int) -> bool:
    """Whether a step goes in tiles: it transforms plainly stored bytes into more than a tile of buffers."""
    return stored is not None and not step.copies_bytes and not step.parts and buffer_cost(step) > tile_bytes


@dataclass(frozen=True)
class Block:
    """One block of a tiled step's output, in storage dtype, and the pooled buffer it lies in."""

    data: np.ndarray
    buffer: np.ndarray


class TileBuffers:
    """The buffers the blocks of tiled tensors are made in: at most `count`, each of `nbytes` or grown to the
    largest block asked for (a block gathered from a mapped source, or one output row that needs more), reused
    for every block of every tiled tensor whatever its size."""

    def __init__(self, count: int, nbytes: int) -> None:
        self._free: list[np.ndarray] = []
        self._unmade = count
        self._nbytes = nbytes
        self._failed = False
        self._cond = threading.Condition()

    def take(self, nbytes: int) -> np.ndarray:
        """A flat uint8 buffer of at least `nbytes`, once one is free (at once after `fail`: the run is stopping)."""
        with self._cond:
            self._cond.wait_for(lambda: self._failed or self._free or self._unmade > 0)
            buffer = self._free.pop() if self._free else None
            if buffer is None and self._unmade > 0:
                self._unmade -= 1
        if buffer is None or buffer.nbytes < nbytes:
            buffer = direct_io.mapped_buffer(max(nbytes, self._nbytes))
        return buffer

    def give_back(self, buffer: np.ndarray) -> None:
        with self._cond:
            self._free.append(buffer)
            self._cond.notify_all()

    def fail(self) -> None:
        with self._cond:
            self._failed = True
            self._cond.notify_all()


def tiled_blocks(step: Step, stored: StoredBytes, tiles: TileBuffers, tile_bytes: int,
                 source: np.ndarray | None = None) -> Iterator[Block]:
    """A step's source, transposed if the step transposes, in consecutive blocks of the output's C order, each in
    a buffer from `tiles` with room for its cast: at most `tile_bytes`, or one output row if that is more.

    A cast alone reads each block from the file as it goes. A transpose takes `source` when it was read into
    memory; otherwise it gathers each block from mapped windows of the file (in the page cache)."""
    storage = dtype_info(step.source.dtype).storage
    per_item = storage.itemsize
    if step.source.dtype != step.target.dtype:
        per_item += dtype_info(step.target.dtype).itemsize

    def block(shape: tuple[int, ...]) -> Block:
        count = math.prod(shape)
        buffer = tiles.take(count * per_item + _ALIGN)
        return Block(buffer[: count * storage.itemsize].view(storage).reshape(shape), buffer)

    if not step.transpose:  # a cast alone: output blocks are source blocks
        count = max(1, tile_bytes // per_item)
        for start in range(0, step.source.numel, count):
            made = block((min(count, step.source.numel - start),))
            direct_io.read_into(stored.path, stored.offset + start * storage.itemsize, made.data)
            yield made
        return
    *experts, rows, cols = step.source.shape
    row_bytes = cols * storage.itemsize
    out_rows = max(1, tile_bytes // (rows * per_item))
    window = max(1, min(tile_bytes, _WINDOW_BYTES) // row_bytes)
    with open(stored.path, "rb", buffering=0) as file:
        for expert in range(math.prod(experts)):  # each expert's [rows, cols] matrix lies whole in the file
            matrix = stored.offset + expert * rows * row_bytes
            for first in range(0, cols, out_rows):
                last = min(cols, first + out_rows)
                made = block((last - first, rows))
                if source is not None:
                    transpose_into(source.reshape(-1, rows, cols)[expert, :, first:last], made.data)
                    yield made
                    continue
                for top in range(0, rows, window):
                    bottom = min(rows, top + window)
                    mapped = np.memmap(file, storage, "r", matrix + top * row_bytes, (bottom - top, cols))
                    transpose_into(mapped[:, first:last], made.data[:, top:bottom])
                    # unmapped here: a mapped page counts as resident while the map lasts
                    del mapped
                yield made


def cast_block(step: Step, block: Block) -> Block:
    """A block with the step's cast applied, made in the rest of the block's own buffer."""
    if step.source.dtype == step.target.dtype:
        return block
    target = dtype_info(step.target.dtype).storage
    start = -(-block.data.nbytes // _ALIGN) * _ALIGN
    out = block.buffer[start: start + block.data.size * target.itemsize].view(target).reshape(block.data.shape)
    return Block(cast_float(block.data, step.source.dtype, step.target.dtype, out), block.buffer)


def read_into_page_cache(stored: StoredBytes) -> None:
    """Bring a tensor's bytes into the page cache once, in large sequential reads, so that tiling it reads memory,
    not the disk. Spliced to /dev/null: the kernel reads the pages and copies nothing out (a read() into a buffer
    cost about 1.8 s of CPU per GB here, in the kernel's copy)."""
    with open(stored.path, "rb", buffering=0) as file, open(os.devnull, "wb", buffering=0) as null:
        done = 0
        while done < stored.length:
            size = min(_CACHE_CHUNK, stored.length - done)
            try:
                sent = os.sendfile(null.fileno(), file.fileno(), stored.offset + done, size)
            except OSError as exc:  # a kernel that splices files to devices only for sockets (not Linux)
                if exc.errno not in (errno.EINVAL, errno.ENOTSOCK, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                read_exact_into(file, stored.offset + done, np.empty(size, np.uint8), stored.path)
                sent = size
            if not sent:
                raise CorruptCheckpoint(f"{stored.path}: file ends {stored.length - done} bytes early: it is truncated")
            done += sent


def transform(step: Step, array: np.ndarray, budget: BufferBudget) -> np.ndarray:
    """Apply a step's transpose and cast, handing each consumed buffer back to the budget."""
    if step.transpose:
        transposed = transpose_last(array, budget.array(swapped_shape(array.shape), array.dtype))
        budget.release(array)
        array = transposed
    return cast(step, array, budget)


def cast(step: Step, array: np.ndarray, budget: BufferBudget) -> np.ndarray:
    """Apply a step's cast to a whole tensor, handing the consumed buffer back."""
    if step.source.dtype == step.target.dtype:
        return array
    result = cast_float(array, step.source.dtype, step.target.dtype,
                        budget.array(array.shape, dtype_info(step.target.dtype).storage))
    budget.release(array)
    return result


_DONE = object()
_END = object()  # to the writer: the last block of a step has come


@dataclass(frozen=True)
class _Tiled:
    """From the reader: a tiled step, its source read into memory (`source`, in `budget`), or for a transpose
    that does not fit there, into the page cache."""

    stored: StoredBytes
    source: np.ndarray | None


@dataclass(frozen=True)
class _JoinedEntry:
    """From the reader: entry `index` of a joined step, joined in the output's orientation (in `budget`)."""

    index: int
    data: np.ndarray


@dataclass(frozen=True)
class _Stream:
    """To the writer: a step's output follows in blocks, then _END; `give_back` hands each block's memory back."""

    give_back: Callable[[Block], None]


class _Stage:
    """A thread that runs `body` over the items of a queue and puts results on the next one."""

    def __init__(self, name: str, body: Callable[[], None], errors: list[BaseException], fail: Callable[[], None]):
        def run() -> None:
            try:
                body()
            except BaseException as exc:  # handed to the calling thread, which re-raises it
                errors.append(exc)
                fail()

        self.thread = threading.Thread(target=run, name=name, daemon=True)
        self.thread.start()


def run_plan(plan: Plan, checkpoint: Checkpoint, writer: CheckpointWriter, *, memory_budget: int = MEMORY_BUDGET,
             tile_bytes: int = TILE_BYTES) -> None:
    """Write every step of `plan` through `writer` (whose tensor order must be `ordered_steps`)."""
    budget = BufferBudget(memory_budget)
    memory_tile_bytes = min(tile_bytes, _MEMORY_TILE_BYTES)
    tiles = TileBuffers(_TILES_IN_FLIGHT, memory_tile_bytes + _ALIGN)  # grown for a block of a mapped source
    errors: list[BaseException] = []
    stop = threading.Event()
    read_queue: queue.Queue = queue.Queue()
    write_queue: queue.Queue = queue.Queue()
    tiled_ahead = BufferBudget(_TILED_AHEAD_BYTES)  # page cache counted, no buffers

    def read_ahead() -> None:
        try:
            for step in ordered_steps(plan, checkpoint):
                if stop.is_set():
                    return
                stored = checkpoint.stored_bytes(step.source.name) if not step.parts else None
                if step.parts:
                    if not read_joined(step):
                        return
                elif stored is not None and step.copies_bytes:
                    read_queue.put((step, stored))
                elif is_tiled(step, stored, tile_bytes):
                    assert stored is not None
                    if not read_tiled(step, stored):
                        return
                else:
                    budget.reserve(buffer_cost(step))
                    if stop.is_set():
                        return
                    array = budget.array(step.source.shape, dtype_info(step.source.dtype).storage)
                    if stored is not None:  # plain bytes: read around the page cache (`direct_io`)
                        direct_io.read_into(stored.path, stored.offset, array)
                    else:
                        read_source(checkpoint, step, array)
                    read_queue.put((step, array))
        finally:
            read_queue.put(_DONE)

    def read_tiled(step: Step, stored: StoredBytes) -> bool:
        """Put a tiled step on the read queue: its source read into memory (around the page cache) if it fits
        beside another, else read into the page cache to be gathered from there; a cast alone reads its own
        blocks. False if the run stopped."""
        if not step.transpose:
            read_queue.put((step, _Tiled(stored, None)))
            return True
        if stored.length <= budget.limit // 2:
            budget.reserve(stored.length)
            if stop.is_set():
                return False
            source = budget.array(step.source.shape, dtype_info(step.source.dtype).storage)
            direct_io.read_into(stored.path, stored.offset, source)
            read_queue.put((step, _Tiled(stored, source)))
            return True
        tiled_ahead.reserve(stored.length)
        if stop.is_set():
            return False
        read_into_page_cache(stored)
        read_queue.put((step, _Tiled(stored, None)))
        return True

    def read_joined(step: Step) -> bool:
        """Join a step's entries one at a time onto the read queue; False if the run stopped."""
        shape = joined_entry_shape(step)
        source = dtype_info(step.source.dtype).storage
        cost = math.prod(shape) * (source.itemsize + (dtype_info(step.target.dtype).itemsize
                                                       if step.source.dtype != step.target.dtype else 0))
        for entry in range(step.source.shape[0]):
            budget.reserve(cost)
            if stop.is_set():
                return False
            data = budget.array(shape, source)
            read_joined_entry(checkpoint, step, entry, data, transpose=step.transpose)
            read_queue.put((step, _JoinedEntry(entry, data)))
        return True

    def write_all() -> None:
        items = _until_done(write_queue)
        for name, data in items:
            if isinstance(data, _Stream):
                data = Pieces(_pieces(items, data.give_back))
            if not stop.is_set():
                writer.write(name, data)
            if isinstance(data, Pieces):
                for _ in data.arrays:  # the blocks a stopped run did not write, handed back
                    pass
            elif isinstance(data, np.ndarray):
                budget.release(data)

    def fail() -> None:  # wakes every stage waiting for buffers
        budget.fail()
        tiles.fail()

    reader = _Stage("vlhub-reader", read_ahead, errors, fail)
    writing = _Stage("vlhub-writer", write_all, errors, fail)
    try:
        for step, data in _until_done(read_queue):
            if errors:
                break
            if isinstance(data, _JoinedEntry):
                if data.index == 0:
                    write_queue.put((step.target.name, _Stream(lambda block: budget.release(block.data))))
                entry = cast(step, data.data, budget)
                write_queue.put((step.target.name, Block(entry, entry)))
                if data.index == step.source.shape[0] - 1:
                    write_queue.put((step.target.name, _END))
                continue
            if isinstance(data, _Tiled):
                write_queue.put((step.target.name, _Stream(lambda block: tiles.give_back(block.buffer))))
                mapped = step.transpose and data.source is None
                block_bytes = tile_bytes if mapped else memory_tile_bytes
                for block in tiled_blocks(step, data.stored, tiles, block_bytes, data.source):
                    if errors:
                        break
                    write_queue.put((step.target.name, cast_block(step, block)))
                write_queue.put((step.target.name, _END))
                if data.source is not None:
                    budget.release(data.source)
                elif step.transpose:
                    tiled_ahead.unreserve(data.stored.length)
                continue
            if isinstance(data, np.ndarray):
                data = transform(step, data, budget)
            write_queue.put((step.target.name, data))
    except BaseException:
        stop.set()  # the other stages drop their work instead of finishing a doomed output
        fail()
        raise
    finally:
        write_queue.put(_DONE)
        if errors:
            stop.set()
            fail()
        writing.thread.join()
        stop.set()
        fail()
        tiled_ahead.fail()  # a reader waiting to read ahead sees the stop
        _drain(read_queue)
        reader.thread.join()
    if errors:
        raise errors[0]


def _pieces(items: Iterator, give_back: Callable[[Block], None]) -> Iterator[np.ndarray]:
    """The blocks of one step as they arrive, each handed back once the writer is done with it; they end early
    (and the writer finds the tensor short) if the run stops in the middle."""
    for _, block in items:
        if block is _END:
            return
        yield block.data
        give_back(block)


def _until_done(items: queue.Queue) -> Iterator:
    while (item := items.get()) is not _DONE:
        yield item


def _drain(items: queue.Queue) -> None:
    while True:
        try:
            items.get_nowait()
        except queue.Empty:
            return
