"""Open any supported checkpoint (file, directory, sharded or not) as one lazy `Checkpoint`."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from vlhub.errors import CorruptCheckpoint, UserError
from vlhub.formats.base import TensorFile
from vlhub.formats.io_utils import StoredBytes, read_exact_into, read_json_file
from vlhub.formats.paths import contained
from vlhub.formats.registry import DIRECTORY_PRECEDENCE, FORMATS, Format, format_of_file
from vlhub.formats.tensors import TensorMeta, dtype_info
from vlhub.keymaps.config import check_config
from vlhub.owned import hold_for_reading, let_go, put_back, sweep

# Official config.json files are a few KB; an index names every tensor (about 100 bytes each), and the
# reference safetensors library allows a header of 100 MB for the same list.
MAX_CONFIG_BYTES = 1 << 20
MAX_INDEX_BYTES = 100_000_000


class RowsOutOfRange(UserError):
    """Rows asked of a tensor that it does not have: the request is wrong, not the file."""


@dataclass
class Checkpoint:
    """A checkpoint whose headers have been read and whose data has not.

    `tensors` maps every name to its `TensorMeta` (shard = path relative to `root`). `read()` and
    `iter_tensors()` read one tensor at a time and keep at most one shard open.
    """

    root: Path
    format: Format
    shards: list[str]
    index_file: str | None
    config: dict | None
    tensors: dict[str, TensorMeta]
    other_formats: list[str] = field(default_factory=list)
    _open: TensorFile | None = field(default=None, repr=False)
    _release: Callable[[], object] | None = field(default=None, repr=False)  # ends the hold for reading

    @property
    def total_bytes(self) -> int:
        return sum(meta.nbytes for meta in self.tensors.values())

    def _file(self, shard: str) -> TensorFile:
        if self._open is None or self._open.path != self.root / shard:
            self._close_file()
            self._open = self.format.reader(self.root / shard)
        return self._open

    def meta(self, name: str) -> TensorMeta:
        """The header entry of one tensor; a name the checkpoint lacks is a one-line error."""
        try:
            return self.tensors[name]
        except KeyError:
            raise UserError(f"no tensor {name!r} in {self.root}") from None

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """One tensor in its storage dtype (bfloat16 as uint16 bits), into `out` if given."""
        return self._file(self.meta(name).shard).read(name, out)

    def stored_bytes(self, name: str) -> StoredBytes | None:
        """Where a tensor's bytes lie, if a writer can copy them without decoding (see `TensorFile`)."""
        return self._file(self.meta(name).shard).stored_bytes(name)

    def read_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows `rows` of a tensor along its first axis in its storage dtype, reading only those rows, each
        distinct one once: token ids of a 2-D embedding table (a prompt repeats its pad tokens hundreds of
        times), or entries of a stacked tensor ([experts, ...]: one expert's slice), shaped
        [len(rows), *shape[1:]]. A row the tensor lacks, negative ones included, raises `RowsOutOfRange`
        before anything is read."""
        meta = self.meta(name)
        if len(meta.shape) < 2:
            raise ValueError(f"{name} is {list(meta.shape)}: rows need a tensor of two or more axes")
        distinct, inverse = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
        outside = distinct[(distinct < 0) | (distinct >= meta.shape[0])]
        if outside.size:
            # unchecked, a row past the end reads the next tensor's bytes, or past the file's end
            if len(meta.shape) == 2:
                raise RowsOutOfRange(f"token id {outside[0]} is outside the embedding table {name} "
                                     f"({meta.shape[0]} rows)")
            raise RowsOutOfRange(f"index {outside[0]} is outside the first axis of {name} ({meta.shape[0]} entries)")
        stored = self.stored_bytes(name)
        if stored is None:  # a pickled view has no byte range of its own
            return self.read(name)[distinct][inverse]
        storage = dtype_info(meta.dtype).storage
        out = np.empty((len(distinct), *meta.shape[1:]), storage)
        row_bytes = int(np.prod(meta.shape[1:], dtype=np.int64)) * storage.itemsize
        with open(stored.path, "rb", buffering=0) as file:
            for target, row in zip(out, distinct):
                read_exact_into(file, stored.offset + int(row) * row_bytes, target, stored.path)
        return out[inverse]

    def iter_blocks(self, name: str, size: int, *, axis: int = 0) -> Iterator[np.ndarray]:
        """A 2-D tensor `size` rows (axis 0) or columns (axis 1) at a time, in its storage dtype.

        Each block is C-contiguous and read straight from the stored bytes: one positioned read per
        block of rows, one per stored row for a block of columns. Blocks are views of one buffer that
        the next block overwrites, so memory stays at one block whatever the tensor's size.
        """
        meta = self.meta(name)
        if len(meta.shape) != 2 or axis not in (0, 1) or size < 1:
            raise ValueError(f"{name} is {list(meta.shape)}: blocks need a 2-D tensor, axis 0 or 1 and size >= 1")
        rows, cols = meta.shape
        extent = meta.shape[axis]
        stored = self.stored_bytes(name)
        if stored is None:
            # a pickled view has no byte range of its own: read it whole once (the one case where
            # memory grows with the tensor), then hand it out in blocks like the others
            whole = self.read(name)
            for start in range(0, extent, size):
                yield np.ascontiguousarray(whole[start:start + size] if axis == 0 else whole[:, start:start + size])
            return
        itemsize = dtype_info(meta.dtype).itemsize
        buffer = np.empty(min(size, extent) * meta.shape[1 - axis], dtype_info(meta.dtype).storage)
        with open(stored.path, "rb", buffering=0) as file:
            for start in range(0, extent, size):
                count = min(size, extent - start)
                if axis == 0:
                    block = buffer[: count * cols].reshape(count, cols)
                    read_exact_into(file, stored.offset + start * cols * itemsize, block, stored.path)
                else:
                    block = buffer[: rows * count].reshape(rows, count)
                    for row in range(rows):
                        offset = stored.offset + (row * cols + start) * itemsize
                        read_exact_into(file, offset, block[row], stored.path)
                yield block

    def iter_tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[TensorMeta, np.ndarray]]:
        """Tensors one at a time, shard by shard, so each shard is opened once."""
        wanted = list(self.tensors if names is None else names)
        shard_order = {shard: i for i, shard in enumerate(self.shards)}
        for name in sorted(wanted, key=lambda n: shard_order[self.meta(n).shard]):
            yield self.tensors[name], self.read(name)

    def close(self) -> None:
        """Close the open shard and end the hold for reading: other processes may now rewrite the checkpoint."""
        self._close_file()
        if self._release is not None:
            self._release()

    def _close_file(self) -> None:
        if self._open is not None:
            self._open.close()
            self._open = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(path: Path | str, *, bf16: bool | None = None) -> Checkpoint:
    """Read the headers of the checkpoint at `path` (a directory, a weight file or an index file).

    In a directory the weights a Paddle loader would pick win (safetensors, then pdparams, then
    torch); the others are listed in `other_formats`. uint16 tensors (how Paddle stores bfloat16)
    are reported as bfloat16 when `bf16` is true, or when it is None and config.json says bfloat16.
    """
    path = Path(path)
    put_back(path)
    if not path.exists():
        raise UserError(f"no such file or directory: {path}")
    root = path if path.is_dir() else path.parent
    _clean_up_after_killed_runs(root)
    held = _hold(path if path.is_file() and not path.name.endswith(".index.json") else root)
    try:
        checkpoint = _open(path, root, bf16)
    except BaseException:
        if held is not None:
            let_go(held)
        raise
    if held is not None:  # let go when the checkpoint is left (`with`), dropped, or the process ends
        checkpoint._release = weakref.finalize(checkpoint, let_go, held)
    return checkpoint


def _hold(path: Path) -> Path | None:
    """Hold the checkpoint for reading (docs/safety.md): nobody rewrites or removes it under this reader. A Hugging
    Face cache snapshot is the cache's to guard (its lock per revision): no lock file goes into its folders."""
    if path.parent.name == "snapshots" or path.parent.parent.name == "snapshots":
        return None
    hold_for_reading(path)
    return path


def _open(path: Path, root: Path, bf16: bool | None) -> Checkpoint:
    config = _read_config(root / "config.json")
    other_formats: list[str] = []
    if path.is_dir():
        fmt, entry, other_formats = _pick_in_directory(path)
    else:
        entry = path.name
        fmt = _format_of_index(entry) if entry.endswith(".index.json") else format_of_file(entry)
        if fmt is None:
            fmt = _format_by_magic(path)
    if entry.endswith(".index.json"):
        shards, tensors = _read_sharded(root, entry, fmt)
        index_file: str | None = entry
    else:
        with fmt.reader(root / entry) as reader:
            tensors = reader.tensors()
        shards, index_file = [entry], None
    if bf16 is None:
        bf16 = config_dtype(config) == "bfloat16"
    if bf16:
        tensors = {n: replace(m, dtype="bfloat16") if m.dtype == "uint16" else m for n, m in tensors.items()}
    return Checkpoint(root, fmt, shards, index_file, config, tensors, other_formats)


def _clean_up_after_killed_runs(root: Path) -> None:
    """Every run that touches a checkpoint removes what killed vlhub runs left in and beside it (docs/safety.md)."""
    with suppress(OSError):  # a folder this user may read but not write: the writers' next run cleans it
        sweep(root.parent, only=root.name)
        sweep(root)


def config_dtype(config: dict | None) -> str | None:
    """The dtype a config.json declares (`dtype` in transformers 5 / Paddle, `torch_dtype` before)."""
    if not config:
        return None
    for holder in (config, config.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if isinstance(holder.get(key), str):
                return holder[key]
    if config.get("bf16") is True:  # Qwen-VL's own flag
        return "bfloat16"
    return None


def _read_config(path: Path) -> dict | None:
    """config.json checked before anything uses its numbers (see `check_config`); None if there is none."""
    if not os.path.lexists(path):  # a dangling or looping symbolic link is an error, not a missing file
        return None
    config = read_json_file(path, MAX_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise CorruptCheckpoint(f"{path}: not a JSON object")
    check_config(config)
    return config


def _format_of_index(name: str) -> Format:
    for fmt in FORMATS.values():
        if name == fmt.index_file or name.endswith(fmt.suffixes[0] + ".index.json"):
            return fmt
    raise UserError(f"{name}: unknown index file; expected one of {', '.join(f.index_file for f in FORMATS.values())}")


def _format_by_magic(path: Path) -> Format:
    with open(path, "rb") as file:
        head = file.read(2)
    if head == b"PK":
        return FORMATS["torch"]
    if head[:1] == b"\x80":
        return FORMATS["pdparams"]
    if len(head) == 2:
        return FORMATS["safetensors"]
    raise CorruptCheckpoint(f"{path}: too short to be a checkpoint")


def _pick_in_directory(directory: Path) -> tuple[Format, str, list[str]]:
    found: list[tuple[Format, str]] = []
    for name in DIRECTORY_PRECEDENCE:
        fmt = FORMATS[name]
        for entry in (fmt.index_file, fmt.single_file):
            if (directory / entry).is_file():
                found.append((fmt, entry))
                break
        else:
            weight_files = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name.endswith(fmt.suffixes))
            if len(weight_files) == 1:
                found.append((fmt, weight_files[0]))
            elif weight_files:
                raise UserError(
                    f"{directory} holds {len(weight_files)} {name} files but no {fmt.index_file}: "
                    "pass one file, or restore the index"
                )
    if not found:
        raise UserError(
            f"no checkpoint in {directory}: expected model.safetensors[.index.json], "
            "model_state.pdparams[.index.json] or pytorch_model.bin[.index.json]"
        )
    (fmt, entry), others = found[0], [f.name for f, _ in found[1:]]
    return fmt, entry, others


def _read_sharded(root: Path, index_name: str, fmt: Format) -> tuple[list[str], dict[str, TensorMeta]]:
    index_path = root / index_name
    index = read_json_file(index_path, MAX_INDEX_BYTES)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CorruptCheckpoint(f"{index_path}: no valid weight_map (tensor name -> shard file)")
    shards = list(dict.fromkeys(weight_map.values()))
    for shard in shards:
        if not contained(root, shard, what="checkpoint", named_in=index_path).is_file():
            raise CorruptCheckpoint(f"{index_path} names shard {shard!r}, which is missing")
    tensors: dict[str, TensorMeta] = {}
    for shard in shards:
        with fmt.reader(root / shard) as reader:
            in_shard = reader.tensors()
        for name, meta in in_shard.items():
            if weight_map.get(name) == shard:
                tensors[name] = replace(meta, shard=shard)
        for name in (n for n, s in weight_map.items() if s == shard):
            if name not in in_shard:
                raise CorruptCheckpoint(f"{index_path} lists tensor {name!r} in {shard!r}, but that file does not hold it")
    return shards, tensors
