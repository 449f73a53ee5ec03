"""Sharded writing, opening checkpoints in every format, round trips, bad indexes, rows and blocks of a tensor."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlhub.errors import CorruptCheckpoint, UserError
from vlhub.formats.readers import open_checkpoint
from vlhub.formats.tensors import TensorMeta
from vlhub.formats.writers import CheckpointWriter, plan_shards
from vlhub.hub.synthetic import cast_float32, synthetic_values


def _tensors(dtype: str) -> list[tuple[TensorMeta, np.ndarray]]:
    shapes = {"embed.weight": (64, 32), "layers.0.w": (32, 32), "layers.0.b": (32,), "layers.1.w": (48, 32),
              "conv.weight": (8, 3, 2, 4, 4), "norm.weight": (32,)}
    return [(TensorMeta(name, dtype, shape), cast_float32(synthetic_values(name, shape), dtype))
            for name, shape in shapes.items()]


def _write(out: Path, fmt: str, tensors: list[tuple[TensorMeta, np.ndarray]], max_shard_size: int) -> list[Path]:
    with CheckpointWriter(out, fmt, [m for m, _ in tensors], max_shard_size=max_shard_size) as writer:
        for meta, array in tensors:
            writer.write(meta.name, array)
    return writer.written


def test_plan_shards_splits_greedily_and_gives_big_tensors_their_own_shard() -> None:
    metas = [TensorMeta(str(i), "uint8", (n,)) for i, n in enumerate([40, 40, 30, 200, 10])]
    assert [[m.name for m in shard] for shard in plan_shards(metas, 100)] == [["0", "1"], ["2"], ["3"], ["4"]]


@pytest.mark.parametrize("fmt", ["safetensors", "pdparams", "torch"])
def test_sharded_checkpoint_uses_ecosystem_names_and_index(tmp_path: Path, fmt: str) -> None:
    tensors = _tensors("float32")
    written = _write(tmp_path, fmt, tensors, max_shard_size=10_000)
    names = sorted(p.name for p in written)
    index_name = {"safetensors": "model.safetensors.index.json", "pdparams": "model_state.pdparams.index.json",
                  "torch": "pytorch_model.bin.index.json"}[fmt]
    assert index_name in names
    index = json.loads((tmp_path / index_name).read_text())
    assert index["metadata"]["total_size"] == sum(m.nbytes for m, _ in tensors)
    shard_names = sorted(set(index["weight_map"].values()))
    assert len(shard_names) > 1
    assert shard_names[0] == {"safetensors": "model-00001-of-0000{n}.safetensors",
                              "pdparams": "model_state-00001-of-0000{n}.pdparams",
                              "torch": "pytorch_model-00001-of-0000{n}.bin"}[fmt].format(n=len(shard_names))
    with open_checkpoint(tmp_path) as checkpoint:
        assert checkpoint.format.name == fmt and checkpoint.index_file == index_name
        for meta, expected in tensors:
            assert np.array_equal(checkpoint.read(meta.name), expected)


def test_one_shard_is_written_without_an_index(tmp_path: Path) -> None:
    written = _write(tmp_path, "safetensors", _tensors("float16"), max_shard_size=10**9)
    assert [p.name for p in written] == ["model.safetensors"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_safetensors_to_pdparams_to_safetensors_is_bit_identical(tmp_path: Path, dtype: str) -> None:
    tensors = _tensors(dtype)
    (tmp_path / "a").mkdir()
    _write(tmp_path / "a", "safetensors", tensors, max_shard_size=10_000)
    steps = [("a", "b", "pdparams"), ("b", "c", "safetensors")]
    for source, target, fmt in steps:
        # the Paddle convention: bf16 stored as uint16, known to be bf16 from config.json
        (tmp_path / source / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "dtype": dtype}))
        with open_checkpoint(tmp_path / source) as checkpoint:
            metas = list(checkpoint.tensors.values())
            with CheckpointWriter(tmp_path / target, fmt, metas, max_shard_size=10_000) as writer:
                for meta, array in checkpoint.iter_tensors([m.name for m in metas]):
                    writer.write(meta.name, array)
    first = {p.name: p.read_bytes() for p in (tmp_path / "a").glob("*.safetensors")}
    last = {p.name: p.read_bytes() for p in (tmp_path / "c").glob("*.safetensors")}
    assert first == last
    with open_checkpoint(tmp_path / "b") as pdparams:
        assert {m.dtype for m in pdparams.tensors.values()} == {dtype}


def test_an_interrupted_write_leaves_no_file_under_a_final_name(tmp_path: Path) -> None:
    tensors = _tensors("float32")
    with pytest.raises(RuntimeError):
        with CheckpointWriter(tmp_path, "safetensors", [m for m, _ in tensors], max_shard_size=10_000) as writer:
            for meta, array in tensors[:3]:
                writer.write(meta.name, array)
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_writing_out_of_order_is_refused(tmp_path: Path) -> None:
    tensors = _tensors("float32")
    with pytest.raises(ValueError, match="out of order"):
        with CheckpointWriter(tmp_path, "safetensors", [m for m, _ in tensors]) as writer:
            writer.write(tensors[1][0].name, tensors[1][1])
    assert list(tmp_path.iterdir()) == []


def _sharded(tmp_path: Path) -> Path:
    _write(tmp_path, "safetensors", _tensors("float32"), max_shard_size=10_000)
    return tmp_path / "model.safetensors.index.json"


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    index = _sharded(tmp_path)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CorruptCheckpoint, match="names shard 'model-00002-of-00003.safetensors', which is missing"):
        open_checkpoint(index)


def test_index_listing_a_tensor_its_shard_lacks(tmp_path: Path) -> None:
    index = _sharded(tmp_path)
    data = json.loads(index.read_text())
    data["weight_map"]["ghost.weight"] = "model-00001-of-00003.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CorruptCheckpoint, match="lists tensor 'ghost.weight'"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd"])
def test_index_pointing_outside_the_checkpoint(tmp_path: Path, shard: str) -> None:
    index = _sharded(tmp_path)
    data = json.loads(index.read_text())
    data["weight_map"]["embed.weight"] = shard
    index.write_text(json.dumps(data))
    with pytest.raises(CorruptCheckpoint, match="outside the checkpoint"):
        open_checkpoint(tmp_path)


def test_malformed_index(tmp_path: Path) -> None:
    index = _sharded(tmp_path)
    index.write_text("{")
    with pytest.raises(CorruptCheckpoint, match="malformed JSON"):
        open_checkpoint(tmp_path)


def test_missing_path_and_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file or directory"):
        open_checkpoint(tmp_path / "nope")
    with pytest.raises(UserError, match="no checkpoint in"):
        open_checkpoint(tmp_path)


def test_directory_precedence_follows_paddlenlp(tmp_path: Path) -> None:
    tensors = _tensors("float32")
    _write(tmp_path, "pdparams", tensors, max_shard_size=10**9)
    _write(tmp_path, "safetensors", tensors, max_shard_size=10**9)
    with open_checkpoint(tmp_path) as checkpoint:
        assert checkpoint.format.name == "safetensors" and checkpoint.other_formats == ["pdparams"]


@pytest.mark.parametrize("fmt", ["safetensors", "pdparams", "torch"])
def test_stored_bytes_copy_into_any_format_bit_identically(tmp_path: Path, fmt: str) -> None:
    tensors = _tensors("bfloat16")
    _write(tmp_path / "src", fmt, tensors, max_shard_size=10_000)
    (tmp_path / "src" / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "dtype": "bfloat16"}))
    with open_checkpoint(tmp_path / "src") as source:
        metas = list(source.tensors.values())
        with CheckpointWriter(tmp_path / "out", "safetensors", metas) as writer:
            for meta in metas:
                stored = source.stored_bytes(meta.name)
                assert stored is not None and stored.length == meta.nbytes
                writer.write(meta.name, stored)
    with open_checkpoint(tmp_path / "out") as copied:
        for meta, expected in tensors:
            assert np.array_equal(copied.read(meta.name), expected)


@pytest.mark.parametrize("fmt", ["safetensors", "pdparams", "torch"])
def test_read_rows_gives_the_rows_asked_for_in_order_with_repeats(tmp_path: Path, fmt: str) -> None:
    table = cast_float32(synthetic_values("embed", (50, 6)), "bfloat16")
    with CheckpointWriter(tmp_path, fmt, [TensorMeta("embed", "bfloat16", (50, 6))]) as writer:
        writer.write("embed", table)
    rows = np.array([7, 3, 7, 49, 0, 3])
    with open_checkpoint(tmp_path, bf16=True) as checkpoint:
        np.testing.assert_array_equal(checkpoint.read_rows("embed", rows), table[rows])


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 40), cols=st.integers(1, 40), size=st.integers(1, 50), axis=st.sampled_from([0, 1]),
    fmt=st.sampled_from(["safetensors", "pdparams", "torch"]), dtype=st.sampled_from(["float16", "float32", "int8"]),
)
def test_iter_blocks_tiles_any_2d_tensor(rows: int, cols: int, size: int, axis: int, fmt: str, dtype: str) -> None:
    array = (np.arange(rows * cols) % 120).reshape(rows, cols).astype(dtype)
    with tempfile.TemporaryDirectory() as directory:
        meta = TensorMeta("t", dtype, (rows, cols))
        with CheckpointWriter(directory, fmt, [TensorMeta("pad", "int8", (3,)), meta]) as writer:
            writer.write("pad", np.zeros(3, np.int8))  # so the table does not start at the data section's start
            writer.write("t", array)
        with open_checkpoint(directory) as checkpoint:
            blocks = [block.copy() for block in checkpoint.iter_blocks("t", size, axis=axis)]
    assert all(block.flags.c_contiguous for block in blocks)
    assert [block.shape[axis] for block in blocks][:-1] == [size] * (len(blocks) - 1)
    assert np.array_equal(np.concatenate(blocks, axis=axis), array)
