"""Tiled conversion (vlhub/convert/pipeline.py): with tile budgets far below a tiny checkpoint's tensors, every
transposed or cast tensor goes in tiles, and each output file is byte for byte the one written untiled, with the
sha256 the writer computed on the way matching the file."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import transformers_qwen2_vl
from vlhub.catalog import get_model
from vlhub.convert.ops import cast_float, transpose_last
from vlhub.convert.pipeline import (
    MEMORY_BUDGET,
    TileBuffers,
    cast_block,
    is_tiled,
    ordered_steps,
    read_into_page_cache,
    run_plan,
    tiled_blocks,
)
from vlhub.convert.plan import Step, plan_conversion
from vlhub.errors import CorruptCheckpoint, UserError
from vlhub.formats.io_utils import Pieces, StoredBytes, write_array
from vlhub.formats.readers import open_checkpoint
from vlhub.formats.safetensors_io import SafetensorsFile
from vlhub.formats.tensors import TensorMeta, bf16_bits_from_float32
from vlhub.formats.writers import CheckpointWriter
from vlhub.hub.synthetic import write_synthetic_checkpoint

UNTILED = 1 << 40


def _convert(source: Path, out: Path, *, layout: str, fmt: str, dtype: str | None, tile_bytes: int,
             memory_budget: int = MEMORY_BUDGET) -> dict[str, bytes]:
    """`source` converted to `layout` in `fmt` with `tile_bytes` tiles: each written file's bytes, checked against
    the sha256 the writer computed while writing."""
    with open_checkpoint(source) as checkpoint:
        plan = plan_conversion(checkpoint.tensors, checkpoint.config, target_layout=layout, dtype=dtype)
        steps = ordered_steps(plan, checkpoint)
        with CheckpointWriter(out, fmt, [step.target for step in steps], max_shard_size=30_000_000) as writer:
            run_plan(plan, checkpoint, writer, tile_bytes=tile_bytes, memory_budget=memory_budget)
    files = {path.name: path.read_bytes() for path in sorted(out.iterdir())}
    for name, digest in writer.sha256.items():
        assert hashlib.sha256(files[name]).hexdigest() == digest, name
    return files


def _tiled_steps(source: Path, *, layout: str, dtype: str | None, tile_bytes: int) -> list[Step]:
    with open_checkpoint(source) as checkpoint:
        plan = plan_conversion(checkpoint.tensors, checkpoint.config, target_layout=layout, dtype=dtype)
        return [step for step in plan.steps
                if is_tiled(step, checkpoint.stored_bytes(step.source.name), tile_bytes)]


@pytest.fixture(scope="module")
def float32_qwen2_vl(module_tmp) -> Path:
    spec = get_model("tiny-qwen2-vl")
    return write_synthetic_checkpoint(module_tmp("float32") / "model", spec.family, spec.config, dtype="float32")


@pytest.fixture(scope="module")
def transformers_saved(module_tmp) -> Path:
    """A Qwen2-VL that transformers itself saved (save_pretrained, bf16, its own names, shards and index)."""
    return transformers_qwen2_vl(module_tmp("transformers") / "model")


@pytest.mark.parametrize(("layout", "fmt", "dtype"), [("paddlemix", "pdparams", None),
                                                      ("paddlemix", "safetensors", "float16"),
                                                      ("official", "torch", "float32")])
@pytest.mark.parametrize("memory_budget", [MEMORY_BUDGET, 1], ids=["sources-in-memory", "sources-in-page-cache"])
def test_a_checkpoint_transformers_saved_converts_tiled_byte_for_byte(transformers_saved: Path, tmp_path: Path,
                                                                      layout: str, fmt: str, dtype: str | None,
                                                                      memory_budget: int) -> None:
    """Not only vlhub's own writer's checkpoints: transformers' file layout and names, with 64 KB tiles that split
    its lm_head and MLP weights (transposed for PaddleMIX, or only cast), give the bytes the untiled run gives,
    whether a transposed tensor's source is read into memory (it fits in half the budget) or gathered from the
    page cache (a 1-byte budget: nothing fits)."""
    tile = 64 << 10
    assert {step.source.name for step in _tiled_steps(transformers_saved, layout=layout, dtype=dtype,
                                                      tile_bytes=tile)} >= {"lm_head.weight"}
    whole = _convert(transformers_saved, tmp_path / "whole", layout=layout, fmt=fmt, dtype=dtype, tile_bytes=UNTILED)
    assert _convert(transformers_saved, tmp_path / "tiled", layout=layout, fmt=fmt, dtype=dtype,
                    tile_bytes=tile, memory_budget=memory_budget) == whole


@pytest.fixture(scope="module")
def resaved_moe(module_tmp) -> Path:
    """The tiny Qwen3-VL MoE in transformers 5's re-save form: converting it to the official form transposes
    every expert of its [experts, ., .] tensors."""
    spec = get_model("tiny-qwen3-vl-moe")
    return write_synthetic_checkpoint(module_tmp("moe") / "model", spec.family, spec.config,
                                      layout=spec.family.keymap.layout("transformers-5"))


@pytest.mark.parametrize("fmt", ["safetensors", "pdparams", "torch"])
@pytest.mark.parametrize("dtype", [None, "float16", "float32"])
def test_tiled_bf16_conversion_is_byte_identical(tiny_qwen2_vl: Path, tmp_path: Path, fmt: str,
                                                  dtype: str | None) -> None:
    """bf16 Qwen2-VL to PaddleMIX's layout (Linear weights transposed), kept in bf16 or cast; 1 MB tiles split
    lm_head [151936, 128] into blocks of 3 output rows, each gathered from 37 mapped windows of source rows."""
    tile = 1 << 20
    tiled = _tiled_steps(tiny_qwen2_vl, layout="paddlemix", dtype=dtype, tile_bytes=tile)
    assert "lm_head.weight" in {step.source.name for step in tiled}
    if dtype is not None:  # the embedding is cast without a transpose: its blocks are rows of the source
        assert any(not step.transpose for step in tiled)
    whole = _convert(tiny_qwen2_vl, tmp_path / "whole", layout="paddlemix", fmt=fmt, dtype=dtype, tile_bytes=UNTILED)
    assert _convert(tiny_qwen2_vl, tmp_path / "tiled", layout="paddlemix", fmt=fmt, dtype=dtype,
                    tile_bytes=tile) == whole


def test_a_reader_holding_its_whole_budget_does_not_stall_the_tiles(tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    """The reader's budget (1 byte: every untiled tensor goes alone, and the reader holds the budget for the tensor
    after a tiled one while it waits) is not the tiles' budget, so the calling thread can still tile: the run ends
    (with one shared budget it waited forever) and writes the same bytes."""
    whole = _convert(tiny_qwen2_vl, tmp_path / "whole", layout="paddlemix", fmt="safetensors", dtype=None,
                     tile_bytes=UNTILED)
    result: list[dict[str, bytes]] = []
    run = threading.Thread(target=lambda: result.append(_convert(
        tiny_qwen2_vl, tmp_path / "tiled", layout="paddlemix", fmt="safetensors", dtype=None, tile_bytes=1 << 20,
        memory_budget=1)), daemon=True)
    run.start()
    run.join(timeout=120)
    assert not run.is_alive(), "the tiled conversion stalled"
    assert result == [whole]


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_tiled_float32_conversion_is_byte_identical(float32_qwen2_vl: Path, tmp_path: Path, dtype: str | None) -> None:
    """float32 weights, transposed as they are or cast down to bf16; 1 MB tiles are smaller than one output row of
    lm_head (607 KB, and its bf16 cast: a block is then that one row) and than the vision merger's first weight."""
    tile = 1 << 20
    tiled = {step.source.name for step in _tiled_steps(float32_qwen2_vl, layout="paddlemix", dtype=dtype,
                                                       tile_bytes=tile)}
    assert {"lm_head.weight", "visual.merger.mlp.0.weight"} <= tiled
    whole = _convert(float32_qwen2_vl, tmp_path / "whole", layout="paddlemix", fmt="pdparams", dtype=dtype,
                     tile_bytes=UNTILED)
    assert _convert(float32_qwen2_vl, tmp_path / "tiled", layout="paddlemix", fmt="pdparams", dtype=dtype,
                    tile_bytes=tile) == whole


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
@pytest.mark.parametrize(("dtype", "tile"), [(None, 10_000), ("float16", 30_000), (None, 200_000)])
def test_tiled_experts_are_byte_identical(resaved_moe: Path, tmp_path: Path, fmt: str, dtype: str | None,
                                          tile: int) -> None:
    """[experts, ., .] tensors transposed expert by expert: tiles smaller than one expert split each expert into
    blocks, larger ones take whole experts."""
    tiled = _tiled_steps(resaved_moe, layout="official", dtype=dtype, tile_bytes=tile)
    assert any(len(step.source.shape) == 3 and step.transpose for step in tiled)
    whole = _convert(resaved_moe, tmp_path / "whole", layout="official", fmt=fmt, dtype=dtype, tile_bytes=UNTILED)
    assert _convert(resaved_moe, tmp_path / "tiled", layout="official", fmt=fmt, dtype=dtype, tile_bytes=tile) == whole


@pytest.mark.parametrize(("tile", "count"), [(1, 15), (50, 15), (60, 9), (4096, 3)])
@pytest.mark.parametrize("in_memory", [False, True])
def test_tiled_blocks_concatenate_to_the_transposed_cast_tensor(tmp_path: Path, tile: int, count: int,
                                                                in_memory: bool) -> None:
    """The blocks of a 3-D tensor whose rows do not divide evenly, down to one output row per block and one source
    row per window, join into its transpose, and cast block by block into the whole tensor's cast: gathered from
    mapped windows of the file, or from the source read into memory."""
    values = np.random.default_rng(0).standard_normal((3, 7, 5), dtype=np.float32)
    bits = bf16_bits_from_float32(values)
    path = tmp_path / "model.safetensors"
    with CheckpointWriter(tmp_path, "safetensors", [TensorMeta("t", "bfloat16", (3, 7, 5))]) as writer:
        writer.write("t", bits)
    with SafetensorsFile(path) as file:
        stored = file.stored_bytes("t")
    step = Step(TensorMeta("t", "bfloat16", (3, 7, 5)), TensorMeta("t", "float16", (3, 5, 7)),
                ("transpose", "cast:bfloat16->float16"))
    tiles = TileBuffers(1, tile)  # one buffer, reused for every block whatever its size
    blocks = []
    source = bits if in_memory else None
    for block in tiled_blocks(step, stored, tiles, tile, source):
        blocks.append(cast_block(step, block).data.copy())
        tiles.give_back(block.buffer)
    assert len(blocks) == count  # an expert's 5 output rows cost 28 bytes each (bf16 and its float16 cast)
    joined = np.concatenate([block.reshape(-1) for block in blocks])
    assert np.array_equal(joined, cast_float(transpose_last(bits), "bfloat16", "float16").reshape(-1))


def test_pieces_that_do_not_make_the_tensor_are_refused() -> None:
    meta = TensorMeta("t", "float32", (2, 3))
    for pieces in ([np.zeros(4, np.float32)], [np.zeros(6, np.float32), np.zeros(1, np.float32)],
                   [np.zeros(6, np.float16)]):
        with pytest.raises(ValueError, match="t: "):
            write_array(io.BytesIO(), meta, Pieces(pieces))
    stream = io.BytesIO()
    write_array(stream, meta, Pieces([np.arange(4, dtype=np.float32), np.arange(2, dtype=np.float32)]))
    assert stream.getvalue() == np.array([0, 1, 2, 3, 0, 1], np.float32).tobytes()


def test_an_error_in_a_tiled_tensor_stops_the_run_and_leaves_nothing(float32_qwen2_vl: Path, tmp_path: Path) -> None:
    """A value float16 cannot hold, in lm_head's last tile: the run stops with the cast's error (no hang, the
    writer's partial tensor dropped) and the writer removes its temporaries."""
    source = tmp_path / "source"
    source.mkdir()
    for path in float32_qwen2_vl.iterdir():
        (source / path.name).write_bytes(path.read_bytes())
    with open_checkpoint(source) as checkpoint:
        stored = checkpoint.stored_bytes("lm_head.weight")
    assert stored is not None
    with open(stored.path, "r+b") as file:
        file.seek(stored.offset + stored.length - 4)
        file.write(np.float32(1e6).tobytes())
    with pytest.raises(UserError, match="float16's range"):
        _convert(source, tmp_path / "out", layout="paddlemix", fmt="safetensors", dtype="float16",
                 tile_bytes=1 << 20)
    assert not any(path.name.endswith(".safetensors") for path in (tmp_path / "out").iterdir())


@pytest.mark.parametrize("splice", [True, False])
def test_bringing_a_tensor_into_the_page_cache_refuses_a_truncated_file(tmp_path: Path, monkeypatch,
                                                                        splice: bool) -> None:
    """Spliced to /dev/null, or read where the kernel cannot splice a file to a device: a file shorter than the
    tensor it should hold is named in one line, not taken as read."""
    if not splice:
        def no_splice(*args: object) -> int:
            raise OSError(errno.EINVAL, "Invalid argument")
        monkeypatch.setattr(os, "sendfile", no_splice)
    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(1000))
    read_into_page_cache(StoredBytes(path, 100, 900))
    with pytest.raises(CorruptCheckpoint, match="file ends 100 bytes early"):
        read_into_page_cache(StoredBytes(path, 200, 900))


@pytest.mark.parametrize(("model", "dtype"), [("tiny-qwen3-vl-moe", None), ("tiny-qwen3-vl-moe", "float32"),
                                              ("tiny-qwen3.5-moe", None), ("tiny-qwen3.5-moe", "float16")])
def test_experts_stored_one_entry_each_are_joined_one_expert_at_a_time(module_tmp, tmp_path: Path, monkeypatch,
                                                                       model: str, dtype: str | None) -> None:
    """Each expert's projections on their own (transformers 5's save of Qwen3.5, a re-save of Qwen3-VL), joined
    into the official [experts, ., .] tensors: the same tensors as the fused checkpoint gives (Qwen3-VL's join
    puts each part's transpose in its columns, Qwen3.5's stacks the parts as stored), while no reservation ever
    holds more than one expert (none reads the joined tensor whole), so memory does not grow with the experts."""
    import torch
    from safetensors.torch import load_file, save_file

    from tests.conformance.factory import per_expert
    from vlhub.convert import pipeline

    spec = get_model(model)
    fused = write_synthetic_checkpoint(module_tmp(f"{model}-fused") / "model", spec.family, spec.config)
    split = tmp_path / "split"
    split.mkdir()
    tensors: dict[str, torch.Tensor] = {}
    for shard in fused.glob("*.safetensors"):
        tensors.update(load_file(shard))
    if model.startswith("tiny-qwen3-vl"):  # its files keep experts [E, in, out]; per_expert takes [E, out, in]
        tensors = {name: t.transpose(1, 2).contiguous() if ".experts." in name else t for name, t in tensors.items()}
    save_file(per_expert(tensors), split / "model.safetensors", metadata={"format": "pt"})
    for path in fused.glob("*.json"):
        if not path.name.endswith(".index.json"):
            (split / path.name).write_bytes(path.read_bytes())
    with open_checkpoint(split) as checkpoint:
        plan = plan_conversion(checkpoint.tensors, checkpoint.config, target_layout="official", dtype=dtype)
        joined = [step for step in plan.steps if step.parts]
    assert joined
    entries: list[int] = []
    read_entry, read_whole = pipeline.read_joined_entry, pipeline.read_source
    monkeypatch.setattr(pipeline, "read_joined_entry", lambda checkpoint, step, entry, out, **kw: (
        entries.append(out.nbytes), read_entry(checkpoint, step, entry, out, **kw)))
    monkeypatch.setattr(pipeline, "read_source", lambda checkpoint, step, out=None: (
        pytest.fail(f"{step.source.name} read whole") if step.parts else read_whole(checkpoint, step, out)))
    ours = _convert(split, tmp_path / "joined", layout="official", fmt="safetensors", dtype=dtype,
                    tile_bytes=UNTILED)
    assert len(entries) == sum(step.source.shape[0] for step in joined)
    assert max(entries) == max(step.source.nbytes // step.source.shape[0] for step in joined)
    monkeypatch.undo()
    expected = _convert(fused, tmp_path / "fused", layout="official", fmt="safetensors", dtype=dtype,
                        tile_bytes=UNTILED)
    ours_loaded, expected_loaded = _tensors(tmp_path / "joined"), _tensors(tmp_path / "fused")
    assert ours and expected and ours_loaded.keys() == expected_loaded.keys()
    for name, tensor in expected_loaded.items():
        assert torch.equal(ours_loaded[name], tensor), name


def _tensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    tensors: dict = {}
    for shard in directory.glob("*.safetensors"):
        tensors.update(load_file(shard))
    return tensors
