"""Hostile input refused by the readers and the key maps: layer counts past the bounds, a malformed index,
safetensors headers the reference library rejects (before any data is read), and row reads outside a tensor
(the commands' one-line refusals of hostile configs: tests/cli/test_hostile_inputs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from tests.helpers import header_entry, safetensors_with_header, with_config_text
from vlhub.catalog import get_model
from vlhub.errors import CorruptCheckpoint, UserError
from vlhub.formats.readers import RowsOutOfRange, open_checkpoint
from vlhub.formats.safetensors_io import SafetensorsFile
from vlhub.formats.tensors import TensorMeta
from vlhub.formats.writers import CheckpointWriter
from vlhub.keymaps import MAX_LAYERS

# --- key maps and indexes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny-qwen-vl", "tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_key_map_expansion_refuses_counts_past_the_bound(model: str) -> None:
    spec = get_model(model)
    config = dict(spec.config, num_hidden_layers=MAX_LAYERS + 1)
    with pytest.raises(UserError, match=f"num_hidden_layers is {MAX_LAYERS + 1}; .* from 1 to {MAX_LAYERS}"):
        spec.family.keymap.expected(config)


@pytest.mark.parametrize("model", ["qwen-vl-7b", "qwen2-vl-72b", "qwen2.5-vl-72b", "qwen2.5-vl-32b", "qwen2-vl-2b"])
def test_every_official_config_is_within_bounds(model: str) -> None:
    spec = get_model(model)
    assert spec.family.keymap.expected(spec.config)


@pytest.mark.parametrize("text", ['{"weight_map": ' + "[" * 5000 + "]" * 5000 + "}", '{"weight_map": NaN}'])
def test_a_hostile_index_is_refused(tiny_qwen2_vl: Path, tmp_path: Path, text: str) -> None:
    directory = with_config_text(tiny_qwen2_vl, tmp_path / "model", (tiny_qwen2_vl / "config.json").read_text())
    (directory / "model.safetensors.index.json").unlink()
    (directory / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CorruptCheckpoint, match="index.json: malformed JSON"):
        open_checkpoint(directory)


# --- safetensors headers -----------------------------------------------------------------------------------

_DATA = 1 << 20  # a data section large enough that reading any of it would show in /proc/self/io


_HALF = _DATA // 2
_TWO = {"a": header_entry("U8", [_HALF], 0, _HALF), "b": header_entry("U8", [_HALF], _HALF, _DATA)}
# (header, data section, header length if not the header's own): each is rejected by the reference library
HOSTILE_HEADERS: dict[str, tuple[dict | bytes, bytes, int | None]] = {
    "length past the file": (_TWO, bytes(_DATA), 10 * _DATA),
    "length over 100 MB": (_TWO, bytes(_DATA), 100_000_001),
    "length cutting the JSON short": (_TWO, bytes(_DATA), 20),
    "length running into the data": (json.dumps(_TWO).encode(), bytes(_DATA), len(json.dumps(_TWO)) + 8),
    "a gap between tensors": ({"a": header_entry("U8", [_HALF - 8], 0, _HALF - 8), "b": _TWO["b"]}, bytes(_DATA), None),
    "a gap at the start": ({"a": header_entry("U8", [_HALF], 8, _HALF + 8)}, bytes(_HALF + 8), None),
    "trailing bytes": (_TWO, bytes(_DATA + 8), None),
    "data not fully covered": ({"a": _TWO["a"]}, bytes(_DATA), None),
    "overlap": ({"a": header_entry("U8", [_HALF + 8], 0, _HALF + 8),
                 "b": header_entry("U8", [_HALF - 8], _HALF, _DATA - 8)}, bytes(_DATA), None),
    "reversed offsets": ({"a": header_entry("U8", [0], 8, 0)}, bytes(8), None),
    "truncated data": (_TWO, bytes(_DATA - 8), None),
    "size not matching the shape": ({"a": header_entry("F32", [_DATA // 4 + 1], 0, _DATA)}, bytes(_DATA), None),
    "a duplicate name": (json.dumps(_TWO).encode()[:-1] + b', "a": ' + json.dumps(_TWO["b"]).encode() + b"}",
                         bytes(_DATA), None),
    "NaN in an entry": (json.dumps(_TWO).encode().replace(b'"shape"', b'"x": NaN, "shape"', 1), bytes(_DATA), None),
    "a 5000-digit integer": (json.dumps(_TWO).encode().replace(b'"shape"', b'"x": ' + b"7" * 5000 + b', "shape"', 1),
                             bytes(_DATA), None),
    "deep nesting": (json.dumps(_TWO).encode().replace(b'"shape"', b'"x": ' + b"[" * 200 + b"]" * 200 + b', "shape"',
                                                       1), bytes(_DATA), None),
    "a lone surrogate": (json.dumps(_TWO).encode().replace(b'"a"', b'"a\\ud800"', 1), bytes(_DATA), None),
    "not UTF-8": (json.dumps(_TWO).encode().replace(b'"a"', b'"\xff"', 1), bytes(_DATA), None),
    "not an object": (b"[" + json.dumps(_TWO).encode() + b"]", bytes(_DATA), None),
    "non-string metadata": ({"__metadata__": {"format": 1}, **_TWO}, bytes(_DATA), None),
    "a float in a shape": ({"a": header_entry("U8", [float(_DATA)], 0, _DATA)}, bytes(_DATA), None),
}


def _bytes_read() -> int:
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])


@pytest.mark.parametrize("case", HOSTILE_HEADERS)
def test_headers_the_reference_rejects_are_refused_before_any_data(tmp_path: Path, case: str) -> None:
    path = safetensors_with_header(tmp_path / "x.safetensors", *HOSTILE_HEADERS[case])
    with pytest.raises(SafetensorError), safe_open(path, "np") as reference:
        list(reference.keys())
    before = _bytes_read()
    with pytest.raises(CorruptCheckpoint) as info:
        SafetensorsFile(path)
    assert _bytes_read() - before < _HALF  # the header and /proc reads, never the data section
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_an_unpadded_header_reads_as_the_reference_reads_it(tmp_path: Path) -> None:
    # the reference writer pads the header to 8 bytes; its reader does not require it
    header = {"a": header_entry("U8", [3], 0, 3)}
    assert len(json.dumps(header)) % 8
    path = safetensors_with_header(tmp_path / "x.safetensors", header, b"xyz")
    with safe_open(path, "np") as reference:
        expected = reference.get_tensor("a")
    with SafetensorsFile(path) as ours:
        assert np.array_equal(ours.read("a"), expected)


@pytest.mark.parametrize(("arrays", "metadata"), [
    ({}, None),
    ({}, {"format": "np", "note": "no tensors"}),
    ({"empty": np.zeros((0, 4), np.float32), "also": np.zeros(0, np.int8), "scalar": np.array(2.0, np.float32)},
     {"format": "np"}),
    ({"first": np.zeros(0, np.float16), "w": np.arange(6, dtype=np.int32).reshape(2, 3),
      "last": np.zeros((3, 0), np.float32)}, None),
], ids=["no-tensors", "metadata-only", "zero-sized", "zero-sized-around-data"])
def test_edge_files_the_reference_writes_still_read(tmp_path: Path, arrays: dict, metadata: dict | None) -> None:
    path = tmp_path / "x.safetensors"
    save_file(arrays, path, metadata=metadata)
    with SafetensorsFile(path) as ours:
        assert ours.metadata == (metadata or {})
        assert set(ours.tensors()) == set(arrays)
        for name, expected in arrays.items():
            got = ours.read(name)
            assert got.shape == expected.shape and np.array_equal(got, expected)


# --- rows outside a tensor ---------------------------------------------------------------------------------


def _table_then_more(directory: Path, fmt: str, last: bool) -> np.ndarray:
    """A 10 x 4 float32 table, with another tensor after it in the file unless `last`."""
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    tensors = [(TensorMeta("embed", "float32", (10, 4)), table)]
    after = (TensorMeta("next", "float32", (4, 4)), np.full((4, 4), 7.0, np.float32))
    tensors = tensors if last else [*tensors, after]
    with CheckpointWriter(directory, fmt, [meta for meta, _ in tensors]) as writer:
        for meta, array in tensors:
            writer.write(meta.name, array)
    return table


@pytest.mark.parametrize("fmt", ["safetensors", "pdparams", "torch"])
@pytest.mark.parametrize("last", [False, True], ids=["inside-the-file", "at-the-end"])
@pytest.mark.parametrize("row", [10, 11, 151644, -1])
def test_rows_outside_the_table_blame_the_request(tmp_path: Path, fmt: str, last: bool, row: int) -> None:
    table = _table_then_more(tmp_path, fmt, last)
    with open_checkpoint(tmp_path) as checkpoint:
        wanted = f"token id {row} is outside the embedding table embed .10 rows."
        with pytest.raises(RowsOutOfRange, match=wanted) as info:
            checkpoint.read_rows("embed", np.array([1, row, 2]))
        assert not isinstance(info.value, CorruptCheckpoint)
        np.testing.assert_array_equal(checkpoint.read_rows("embed", np.array([9, 0, 9])), table[[9, 0, 9]])


def test_rows_of_a_stored_view_are_checked_too(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    # a transposed view has no byte range of its own: rows come from the whole tensor, where -1 would wrap
    torch.save({"embed": torch.arange(40, dtype=torch.float32).reshape(4, 10).t()}, tmp_path / "pytorch_model.bin")
    with open_checkpoint(tmp_path) as checkpoint:
        assert checkpoint.stored_bytes("embed") is None
        with pytest.raises(RowsOutOfRange, match="token id -1 is outside"):
            checkpoint.read_rows("embed", np.array([-1]))


def test_an_unknown_tensor_name_is_one_line_everywhere(tmp_path: Path) -> None:
    _table_then_more(tmp_path, "safetensors", last=True)
    with open_checkpoint(tmp_path) as checkpoint:
        for call in (lambda: checkpoint.stored_bytes("nope"), lambda: checkpoint.read_rows("nope", np.array([0])),
                     lambda: next(checkpoint.iter_blocks("nope", 2))):
            with pytest.raises(UserError, match="no tensor 'nope'"):
                call()
