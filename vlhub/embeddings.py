"""`vlhub dump-embeddings`: the token-embedding table as a raw row-major file, for runtimes that embed
tokens on the host (VastAI's `embed_tokens.bin`), without loading the model.

    dump = prepare_dump("qwen2-vl-7b", out=Path("embed_tokens.bin"), dtype="float16", lm_head=True)
    files = dump.write()

The table is found through the family's key map in whatever layout the checkpoint uses, read in
blocks of rows straight from its stored bytes, cast (round to nearest even through float32), and
written under a temporary name that is renamed into place once complete, beside a JSON sidecar
(`embed_tokens.json`: shape, dtype, source, tensor name, layout, sha256). Memory stays at a few
blocks whatever the vocabulary size.

Formats: `bin` is little-endian row-major [vocab, hidden] with no header (row i = token i); `npy` is a
standard .npy file holding the same bytes after its header. numpy has no bfloat16, so `npy` refuses
`bfloat16` rather than store bits `np.load` would read as integers (`float32` holds every bfloat16
value exactly). Tensors a Paddle layout stores transposed (lm_head, Linear weights [in, out]) are
written [out, in], so row i is still token i.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlhub import __version__
from vlhub.atomic import commit_files, disk_full, ensure_free_space
from vlhub.catalog import find_model
from vlhub.convert.layouts import UNKNOWN, detect_family, detect_layout, embedding_candidates, spellings
from vlhub.convert.ops import FLOAT_DTYPES, cast_float, transpose_2d
from vlhub.errors import UserError
from vlhub.formats.readers import Checkpoint, open_checkpoint
from vlhub.formats.tensors import TensorMeta, dtype_info
from vlhub.formats.writers import write_json
from vlhub.hub.sources import resolve_source
from vlhub.keymaps import load_keymap
from vlhub.keymaps.config import tie_word_embeddings
from vlhub.owned import is_disk_full, sweep, temporary_name, writing

DTYPES = ("float16", "bfloat16", "float32")
FORMATS = ("bin", "npy")
LM_HEAD = "lm_head.weight"  # the output projection's official name in every family
# Stored bytes per block: 16 MiB reads are what io_utils measured fastest on a cold disk, and a dump
# holds only a few blocks (the read, two output buffers being cast and written in turn).
BLOCK_BYTES = 16 << 20
# The cast is the slow step (numpy converts float32 -> float16 at under 1 GB/s), so a block is cast on
# every core. Measured bf16 -> fp16 on this project's 2-core machine: 0.87 GB/s on one thread (cast_float
# keeps its float32 temporaries in cache), 1.6 GB/s on two.
_CAST_THREADS = min(4, os.cpu_count() or 1)

OnBytes = Callable[[int], None]


@dataclass(frozen=True)
class Table:
    """One 2-D tensor to dump, as the checkpoint stores it."""

    role: str  # "embedding" (found by the key map), "tensor" (named by --tensor) or "lm_head"
    tensor: str  # its name in the checkpoint
    stored_shape: tuple[int, int]
    dtype: str  # its stored dtype (bfloat16 travels as uint16 bits)
    transposed: bool  # stored [hidden, vocab] (Paddle's Linear [in, out]): output rows are stored columns
    tied: bool = False  # an lm_head that is the embedding

    @property
    def shape(self) -> tuple[int, int]:
        """[rows, cols] as written: row i is token i."""
        rows, cols = self.stored_shape
        return (cols, rows) if self.transposed else (rows, cols)


@dataclass
class DumpedFile:
    """One written table: its path, its sidecar and the sidecar's content."""

    path: Path
    sidecar: Path
    info: dict


@dataclass
class EmbeddingDump:
    """A planned dump: `outputs` says which table goes where; `write()` writes them."""

    source: str
    source_path: Path
    checkpoint: Checkpoint
    family: str | None
    layout: str
    dtype: str
    format: str
    outputs: list[tuple[Table, Path]]
    overwrite: bool = False

    @property
    def total_bytes(self) -> int:
        """Bytes of table data the outputs hold (headers aside)."""
        itemsize = dtype_info(self.dtype).itemsize
        return sum(table.shape[0] * table.shape[1] * itemsize for table, _ in self.outputs)

    def write(self, on_bytes: OnBytes | None = None, *, block_bytes: int = BLOCK_BYTES) -> list[DumpedFile]:
        """Write every table and sidecar under a temporary name, then rename them all into place in one commit.

        The outputs are locked against a second writer for the whole run; on an error, an interruption or a
        kill, nothing is published half (see `commit_files`) and no temporary outlives the next run there.
        """
        with ExitStack() as held:
            for _, path in self.outputs:
                held.enter_context(writing(path))
            if not self.overwrite:
                _refuse_existing([path for _, path in self.outputs])  # again, now that nobody else writes them
            moves: list[tuple[Path, Path]] = []
            try:
                dumped = []
                for table, path in self.outputs:
                    temp = temporary_name(path)
                    moves.append((temp, path))
                    try:
                        digest = write_table(self.checkpoint, table, temp, self.dtype, self.format,
                                             on_bytes=on_bytes, block_bytes=block_bytes)
                    except OSError as exc:
                        if not is_disk_full(exc):
                            raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
                        for written, _ in moves:
                            written.unlink(missing_ok=True)  # first: the free space reported counts it back
                        raise disk_full(path, self.total_bytes, "the tables") from None
                    info = self._sidecar(table, path, digest, temp.stat().st_size)
                    sidecar = sidecar_path(path)
                    moves.append((write_json(temporary_name(sidecar), info), sidecar))
                    dumped.append(DumpedFile(path, sidecar, info))
                commit_files(moves)
                return dumped
            finally:
                for temp, _ in moves:
                    with contextlib.suppress(OSError):  # a failed cleanup must not hide why the write failed
                        temp.unlink(missing_ok=True)
                self.checkpoint.close()

    def _sidecar(self, table: Table, path: Path, digest: str, size: int) -> dict:
        model = find_model(self.source)
        info = {
            "file": path.name,
            "format": self.format,
            "shape": list(table.shape),
            "dtype": self.dtype,
            "byte_order": "little",
            "size": size,
            "sha256": digest,
            "role": table.role,
            "tensor": table.tensor,
            "transposed": table.transposed,
            "source": {
                "path": str(self.source_path.absolute()),
                "model": model.name if model else None,
                "format": self.checkpoint.format.name,
                "family": self.family,
                "layout": self.layout,
                "dtype": table.dtype,
            },
            "vlhub_version": __version__,
        }
        if table.role == "lm_head":
            info["tied"] = table.tied
        return info


def prepare_dump(
    source: str,
    *,
    out: Path | str | None = None,
    dtype: str = "float16",
    format: str = "bin",
    tensor: str | None = None,
    lm_head: bool = False,
    overwrite: bool = False,
) -> EmbeddingDump:
    """Find the table(s) and check every option; only headers are read and nothing is written.

    `out` is a file path or an existing directory (default: `./embed_tokens.<format>`); with `lm_head`
    the output projection goes beside it as `lm_head.<format>`. `tensor` names the table explicitly
    instead of the family's embedding. An existing output or sidecar is refused unless `overwrite`.
    """
    if dtype not in DTYPES:
        raise UserError(f"unsupported --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if format not in FORMATS:
        raise UserError(f"unsupported --format {format!r}; choose one of {', '.join(FORMATS)}")
    if format == "npy" and dtype == "bfloat16":
        raise UserError("numpy has no bfloat16, so --format npy cannot hold it: use --format bin, "
                        "or --dtype float32 (exact for every bfloat16 value)")
    paths = output_paths(out, format, lm_head)
    sweep(paths[0].parent)  # a killed dump's half-done commit is completed before its files are judged
    source_path = resolve_source(source)
    checkpoint = open_checkpoint(source_path)
    try:
        family = detect_family(checkpoint.config, list(checkpoint.tensors))
        layout = detect_layout(family, checkpoint.tensors, checkpoint.config)
        if tensor:
            tables = [_table(checkpoint, family, layout, tensor, role="tensor")]
        else:
            tables = [_table(checkpoint, family, layout, find_embedding(checkpoint, family, layout), role="embedding")]
        if lm_head:
            tables.append(_lm_head(checkpoint, family, layout, compare_with=None if tensor else tables[0]))
        _refuse_overwriting_the_source(checkpoint, paths)
        if not overwrite:
            _refuse_existing(paths)
        dump = EmbeddingDump(source, source_path, checkpoint, family, layout, dtype, format, list(zip(tables, paths)),
                             overwrite)
        ensure_free_space(paths[0].parent, dump.total_bytes, "the tables")
    except BaseException:
        checkpoint.close()
        raise
    return dump


def output_paths(out: Path | str | None, format: str, lm_head: bool) -> list[Path]:
    """The table's output path (and lm_head's beside it), checked so that nothing fails later."""
    default = f"embed_tokens.{format}"
    path = Path(out) if out is not None else Path(default)
    if path.is_dir() or (out is not None and str(out).endswith(("/", os.sep))):  # a trailing slash: a directory
        path = path / default
    path = path.absolute()
    if not path.parent.is_dir():
        raise UserError(f"{path.parent} does not exist: create it first, or choose another --out")
    if path.suffix == ".json":
        raise UserError(f"--out {path.name}: the .json name is taken by the sidecar; choose another name")
    # a raw table named .npy (or a .npy file named .bin) is what np.load or the runtime then misreads
    if path.suffix in (f".{other}" for other in FORMATS if other != format):
        raise UserError(f"--out {path.name} names a {path.suffix} file but --format is {format}: "
                        f"pass --format {path.suffix[1:]}, or name it .{format}")
    paths = [path]
    if lm_head:
        head = path.with_name("lm_head" + (path.suffix or f".{format}"))
        if sidecar_path(head) == sidecar_path(path):
            raise UserError(f"--out {path.name} would collide with the lm_head output; choose another name")
        paths.append(head)
    return paths


def _refuse_overwriting_the_source(checkpoint: Checkpoint, paths: list[Path]) -> None:
    """An output (or its sidecar) must not replace one of the checkpoint's own files."""
    own = {(checkpoint.root / name).resolve() for name in [*checkpoint.shards, checkpoint.index_file, "config.json"]
           if name}
    for path in paths:
        for target in (path, sidecar_path(path)):
            if target.resolve() in own:
                raise UserError(f"--out {target} would overwrite the checkpoint's own {target.name}; "
                                "choose another path")


def _refuse_existing(paths: list[Path]) -> None:
    """An output or sidecar that exists is someone's earlier dump (or another file): replaced only on request."""
    for path in paths:
        for target in (path, sidecar_path(path)):
            if os.path.lexists(target):
                raise UserError(f"{target} exists; pass --overwrite to replace it, or choose another --out")


def sidecar_path(path: Path) -> Path:
    """Where a table's JSON sidecar goes: `embed_tokens.bin` -> `embed_tokens.json`."""
    return path.with_suffix(".json")


def find_embedding(checkpoint: Checkpoint, family: str | None, layout: str) -> str:
    """The embedding table's name in this checkpoint, from the key map."""
    candidates = embedding_candidates(family, layout)
    found = next((name for name in candidates if name in checkpoint.tensors), None)
    if found is None:
        raise UserError(f"no embedding table in {checkpoint.root}: looked for {', '.join(candidates)}"
                        f"{_largest_tables(checkpoint)}; name it with --tensor NAME")
    return found


def write_table(
    checkpoint: Checkpoint,
    table: Table,
    path: Path,
    dtype: str,
    format: str,
    *,
    on_bytes: OnBytes | None = None,
    block_bytes: int = BLOCK_BYTES,
) -> str:
    """Stream one table into `path` block by block (cast, and transposed back if stored so); its sha256.

    Block i+1 is read and cast (on every core) while a writer thread hashes and writes block i, so the
    disk, the cast and the hash overlap; two output buffers take turns.
    """
    rows, cols = table.shape
    per_block = max(1, block_bytes // (cols * dtype_info(table.dtype).itemsize))
    blocks = checkpoint.iter_blocks(table.tensor, per_block, axis=1 if table.transposed else 0)
    scratch = np.empty(min(per_block, rows) * cols if table.transposed else 0, dtype_info(table.dtype).storage)
    outputs = [np.empty(min(per_block, rows) * cols, dtype_info(dtype).storage) for _ in range(2)]
    pending: list[Future[None] | None] = [None, None]
    digest = hashlib.sha256()
    with (open(path, "wb") as file, ThreadPoolExecutor(1, thread_name_prefix="vlhub-write") as writer,
          ThreadPoolExecutor(_CAST_THREADS, thread_name_prefix="vlhub-cast") as casters):

        def emit(data: bytes | memoryview) -> None:
            digest.update(data)
            file.write(data)

        if format == "npy":
            emit(_npy_header((rows, cols), dtype))
        for i, block in enumerate(blocks):
            count = block.shape[1] if table.transposed else block.shape[0]
            if table.transposed:
                block = transpose_2d(block, out=scratch[: count * cols].reshape(count, cols))
            slot = i % 2
            if (previous := pending[slot]) is not None:
                previous.result()  # its buffer is about to be overwritten
            target = outputs[slot][: count * cols].reshape(count, cols)
            if table.dtype == dtype:
                np.copyto(target, block)
            else:
                _cast_on_threads(casters, block.reshape(-1), table.dtype, target.reshape(-1), dtype)
            pending[slot] = writer.submit(emit, memoryview(target.reshape(-1)).cast("B"))
            if on_bytes:
                on_bytes(target.nbytes)
        for future in pending:
            if future is not None:
                future.result()
    return digest.hexdigest()


def _cast_on_threads(pool: ThreadPoolExecutor, source: np.ndarray, source_dtype: str, target: np.ndarray,
                     target_dtype: str) -> None:
    """cast_float of a 1-D array into `target`, one share per thread of the pool."""
    share = max(1, -(-source.size // _CAST_THREADS))
    casts = [pool.submit(cast_float, source[start:start + share], source_dtype, target_dtype,
                         target[start:start + share]) for start in range(0, source.size, share)]
    for cast in casts:
        cast.result()


def _npy_header(shape: tuple[int, int], dtype: str) -> bytes:
    header = io.BytesIO()
    descr = np.lib.format.dtype_to_descr(dtype_info(dtype).storage)
    np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": shape})
    return header.getvalue()


def _stored_transposed(family: str | None, layout: str, name: str) -> bool:
    """Whether the layout stores this tensor transposed (Paddle's Linear [in, out]), per the key map."""
    if family is None or layout == UNKNOWN:
        return False
    keymap = load_keymap(family)
    rule = keymap.rule_for(keymap.layouts[layout].to_official(name))
    return rule is not None and keymap.layouts[layout].transposes(rule.kind)


def _table(checkpoint: Checkpoint, family: str | None, layout: str, name: str, *, role: str,
           tied: bool = False) -> Table:
    meta = checkpoint.tensors.get(name)
    if meta is None:
        raise UserError(f"no tensor {name!r} in {checkpoint.root}{_largest_tables(checkpoint)}")
    if len(meta.shape) != 2:
        raise UserError(f"{name} is {_shape(meta)}, not a 2-D table: name a [rows, cols] tensor with --tensor")
    if 0 in meta.shape:
        raise UserError(f"{name} is {_shape(meta)}: an empty table")
    if meta.dtype not in FLOAT_DTYPES:
        hint = (" (how Paddle stores bfloat16: if it is, say dtype bfloat16 in config.json)"
                if meta.dtype == "uint16" else "")
        raise UserError(f"{name} is {meta.dtype}, not a floating-point table{hint}")
    return Table(role, name, (meta.shape[0], meta.shape[1]), meta.dtype, _stored_transposed(family, layout, name),
                 tied)


def _lm_head(checkpoint: Checkpoint, family: str | None, layout: str, compare_with: Table | None) -> Table:
    if tie_word_embeddings(checkpoint.config or {}):
        embedding = find_embedding(checkpoint, family, layout)
        return _table(checkpoint, family, layout, embedding, role="lm_head", tied=True)
    candidates = spellings(family, layout, lambda keymap: [LM_HEAD])
    found = next((name for name in candidates if name in checkpoint.tensors), None)
    if found is None:
        raise UserError(f"no lm_head in {checkpoint.root}: looked for {', '.join(candidates)}, and config.json "
                        "does not tie it to the embedding (tie_word_embeddings)")
    head = _table(checkpoint, family, layout, found, role="lm_head")
    if compare_with is not None and head.shape != compare_with.shape:
        raise UserError(f"{found} would be written {list(head.shape)} but the embedding is "
                        f"{list(compare_with.shape)}: the layout ({layout}) does not explain its orientation")
    return head


def _largest_tables(checkpoint: Checkpoint, count: int = 3) -> str:
    tables = sorted((m for m in checkpoint.tensors.values() if len(m.shape) == 2), key=lambda m: -m.numel)[:count]
    return f" (its largest 2-D tensors: {', '.join(f'{m.name} {_shape(m)}' for m in tables)})" if tables else ""


def _shape(meta: TensorMeta) -> str:
    return "[" + ", ".join(map(str, meta.shape)) + "]"
