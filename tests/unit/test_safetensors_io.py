"""safetensors reading and writing against the reference `safetensors` library, and bad files."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from vlhub.errors import CorruptCheckpoint
from vlhub.formats.safetensors_io import SafetensorsFile, SafetensorsShardWriter
from vlhub.formats.tensors import TensorMeta


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "a.weight": rng.standard_normal((3, 5)).astype(np.float32),
        "b.bias": rng.standard_normal(7).astype(np.float16),
        "c.ids": np.arange(6, dtype=np.int64).reshape(2, 3),
        "d.scalar": np.array(3.5, dtype=np.float32),
        "e.empty": np.zeros((0, 4), dtype=np.float32),
    }


def test_reads_what_the_reference_library_writes(tmp_path: Path) -> None:
    arrays = _arrays()
    save_file(arrays, tmp_path / "x.safetensors", metadata={"format": "np"})
    with SafetensorsFile(tmp_path / "x.safetensors") as reader:
        assert reader.metadata == {"format": "np"}
        assert set(reader.tensors()) == set(arrays)
        for name, expected in arrays.items():
            meta = reader.tensors()[name]
            assert meta.shape == expected.shape and meta.shard == "x.safetensors"
            got = reader.read(name)
            assert got.dtype == expected.dtype and np.array_equal(got, expected)


def test_reference_library_reads_what_we_write_including_bf16(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as torch_load_file

    values = torch.randn(4, 6, dtype=torch.bfloat16)
    bits = values.view(torch.int16).numpy().view(np.uint16)
    metas = [TensorMeta("w", "bfloat16", (4, 6)), TensorMeta("b", "float32", (6,))]
    bias = np.linspace(0, 1, 6, dtype=np.float32)
    with open(tmp_path / "y.safetensors", "wb") as stream:
        writer = SafetensorsShardWriter(stream, metas, {"format": "pt"})
        writer.write(metas[0], bits)
        writer.write(metas[1], bias)
        writer.finish()
    loaded = torch_load_file(tmp_path / "y.safetensors")
    assert loaded["w"].dtype == torch.bfloat16 and torch.equal(loaded["w"], values)
    assert np.array_equal(loaded["b"].numpy(), bias)


def _valid_file(tmp_path: Path) -> Path:
    path = tmp_path / "v.safetensors"
    save_file({"x": np.ones((4, 4), np.float32), "y": np.zeros(8, np.float32)}, path)
    return path


def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:5]), "truncated"),
        (lambda p: p.write_bytes(struct.pack("<Q", 10**9) + p.read_bytes()[8:]), "larger than the file"),
        (lambda p: p.write_bytes(p.read_bytes()[:8] + b"{not json" + p.read_bytes()[17:]), "header: malformed JSON"),
        (lambda p: p.write_bytes(p.read_bytes()[:-16]), "outside the data section"),
        (lambda p: _rewrite_header(p, lambda h: h["y"].update(data_offsets=[0, 32])), "overlap"),
        (lambda p: _rewrite_header(p, lambda h: h["x"].update(data_offsets=[0, 60])), "needs 64"),
        (lambda p: _rewrite_header(p, lambda h: h["x"].update(dtype="Q7")), "unsupported dtype"),
        (lambda p: _rewrite_header(p, lambda h: h["x"].update(shape=[4, -4])), "malformed shape"),
    ],
    ids=["truncated", "header-too-long", "bad-json", "data-truncated", "overlap", "size-mismatch", "dtype", "shape"],
)
def test_corrupt_files_raise_one_clean_error(tmp_path: Path, mutate, message: str) -> None:
    path = _valid_file(tmp_path)
    mutate(path)
    with pytest.raises(CorruptCheckpoint, match=message) as info:
        SafetensorsFile(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_writer_rejects_an_array_that_is_not_the_planned_one() -> None:
    meta = TensorMeta("w", "float16", (2, 2))
    writer = SafetensorsShardWriter(io.BytesIO(), [meta])
    with pytest.raises(ValueError, match="planned float16"):
        writer.write(meta, np.zeros((2, 2), np.float32))


def test_reading_one_tensor_reads_only_its_bytes(tmp_path: Path) -> None:
    big = np.zeros((4096, 4096), np.float32)  # 64 MB
    save_file({"big": big, "small": np.ones(16, np.float32)}, tmp_path / "s.safetensors")

    def bytes_read() -> int:
        return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])

    before = bytes_read()
    with SafetensorsFile(tmp_path / "s.safetensors") as reader:
        assert reader.read("small").sum() == 16
    assert bytes_read() - before < 64 * 1024


def _read_everything(path: Path) -> None:
    with SafetensorsFile(path) as reader:
        for name in reader.tensors():
            reader.read(name)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=512))
def test_random_bytes_read_or_fail_cleanly(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    try:
        _read_everything(path)
    except CorruptCheckpoint:
        pass


_header_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tensor=st.sampled_from(["x", "y", "__metadata__"]),
       field=st.sampled_from(["dtype", "shape", "data_offsets", "extra"]),
       value=_header_values, cut=st.integers(0, 200))
def test_mutated_headers_read_correctly_or_fail_cleanly(tmp_path: Path, tensor: str, field: str,
                                                        value: object, cut: int) -> None:
    path = _valid_file(tmp_path)

    def edit(header: dict) -> None:
        entry = header.setdefault(tensor, {})
        if isinstance(entry, dict):
            entry[field] = value

    _rewrite_header(path, edit)
    if cut:
        path.write_bytes(path.read_bytes()[:-cut])
    try:
        _read_everything(path)
    except CorruptCheckpoint:
        pass
