"""The pickle-based formats (.pdparams, torch zip): paddle/torch round trips, hostile pickles, fuzzing, laziness."""

from __future__ import annotations

import io
import math
import pickle
import struct
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlhub.errors import CorruptCheckpoint, UnsafePickle
from vlhub.formats.pdparams_io import PdparamsFile, PdparamsShardWriter
from vlhub.formats.tensors import TensorMeta, bf16_bits_from_float32
from vlhub.formats.torch_io import TorchBinFile, TorchBinShardWriter

if TYPE_CHECKING:
    import torch

Reader = type[PdparamsFile] | type[TorchBinFile]
Writer = type[PdparamsShardWriter] | type[TorchBinShardWriter]
FORMATS = [(PdparamsShardWriter, PdparamsFile), (TorchBinShardWriter, TorchBinFile)]

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
KB = 1 << 10
MB = 1 << 20


def sample_tensors(seed: int = 0) -> list[tuple[TensorMeta, np.ndarray]]:
    """bf16 (as uint16 bits), fp16 and fp32 tensors of a few shapes, including 0-d and empty ones."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(64).astype(np.float32)
    return [
        (TensorMeta("model.embed.weight", "bfloat16", (3, 5)), bf16_bits_from_float32(values[:15]).reshape(3, 5)),
        (TensorMeta("model.norm.weight", "float16", (7,)), values[:7].astype(np.float16)),
        (TensorMeta("visual.proj", "float32", (2, 3, 4)), values[:24].reshape(2, 3, 4)),
        (TensorMeta("scale", "float32", ()), np.array(values[0])),
        (TensorMeta("empty", "float16", (0, 4)), np.zeros((0, 4), np.float16)),
    ]


def write_shard(writer: Writer, path: Path, items: list[tuple[TensorMeta, np.ndarray]]) -> None:
    with open(path, "wb") as stream:
        shard = writer(stream, [meta for meta, _ in items])
        for meta, array in items:
            shard.write(meta, array)
        shard.finish()


def read_all(reader: Reader, path: Path) -> dict[str, np.ndarray]:
    with reader(path) as opened:
        return {name: opened.read(name) for name in opened.tensors()}


def assert_bits_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.flags.c_contiguous
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert actual.tobytes() == expected.tobytes()


def torch_bits(tensor: torch.Tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


# --- .pdparams against paddle ------------------------------------------------------------------


def test_our_pdparams_loads_in_paddle(tmp_path: Path) -> None:
    paddle = pytest.importorskip("paddle")
    items = sample_tensors()
    path = tmp_path / "model_state.pdparams"
    write_shard(PdparamsShardWriter, path, items)

    as_tensors = paddle.load(str(path))
    as_numpy = paddle.load(str(path), return_numpy=True)

    assert list(as_tensors) == [meta.name for meta, _ in items]
    for meta, array in items:
        expected_dtype = {"bfloat16": paddle.bfloat16, "float16": paddle.float16, "float32": paddle.float32}
        assert as_tensors[meta.name].dtype == expected_dtype[meta.dtype]
        assert_bits_equal(as_tensors[meta.name].numpy(), array)
        assert_bits_equal(as_numpy[meta.name], array)


@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_paddle_saved_pdparams_read_bit_exactly(tmp_path: Path, protocol: int) -> None:
    paddle = pytest.importorskip("paddle")
    values = paddle.to_tensor(np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32))
    saved = {
        "w32": values,
        "w16": values.astype("float16"),
        "wbf16": values.astype("bfloat16"),
        "scalar": values[0, 0],
    }
    path = tmp_path / "saved.pdparams"
    paddle.save(saved, str(path), protocol=protocol)

    with PdparamsFile(path) as opened:
        metas = opened.tensors()
        assert list(metas) == list(saved)
        assert {name: meta.dtype for name, meta in metas.items()} == {
            "w32": "float32",
            "w16": "float16",
            "wbf16": "uint16",
            "scalar": "float32",
        }
        assert all(meta.shard == "saved.pdparams" for meta in metas.values())
        for name, tensor in saved.items():
            assert metas[name].shape == tuple(tensor.shape)
            assert_bits_equal(opened.read(name), tensor.numpy())


def test_paddle_saved_layer_state_dict_reads(tmp_path: Path) -> None:
    paddle = pytest.importorskip("paddle")
    state = paddle.nn.Linear(3, 2).state_dict()
    path = tmp_path / "layer.pdparams"
    paddle.save(state, str(path))

    read = read_all(PdparamsFile, path)

    assert list(read) == list(state)
    for name, tensor in state.items():
        assert_bits_equal(read[name], tensor.numpy())


def test_split_big_param_reads_as_the_original_tensor(tmp_path: Path) -> None:
    # paddle splits above (2**30 - 1) / itemsize elements with no way to lower the threshold, so this
    # mirrors `_unpack_saved_dict` with a 7-element threshold and lets paddle.load confirm the structure
    rng = np.random.default_rng(2)
    original = rng.standard_normal((6, 5)).astype(np.float32)
    before, after = rng.standard_normal(3).astype(np.float32), np.arange(4, dtype=np.uint16)
    flat = original.flatten()
    piece_names = [f"big@@.{i}" for i in range(math.ceil(flat.size / 7))]
    saved: dict[str, object] = {"before": before, "after": after}
    saved.update({name: flat[i * 7 : (i + 1) * 7] for i, name in enumerate(piece_names)})
    saved["UnpackBigParamInfor@@"] = {"big": {"OriginShape": original.shape, "slices": piece_names}}
    path = tmp_path / "split.pdparams"
    path.write_bytes(pickle.dumps(saved, protocol=2))

    paddle = pytest.importorskip("paddle")
    assert_bits_equal(paddle.load(str(path), return_numpy=True)["big"], original)

    with PdparamsFile(path) as opened:
        metas = opened.tensors()
        assert list(metas) == ["before", "after", "big"]
        assert metas["big"] == TensorMeta("big", "float32", (6, 5), shard="split.pdparams")
        assert_bits_equal(opened.read("big"), original)
        assert_bits_equal(opened.read("before"), before)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_plain_pickles_of_any_layout_read_c_contiguous(tmp_path: Path, protocol: int) -> None:
    base = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    arrays = {
        "fortran": np.asfortranarray(base),
        "transposed": base.transpose(1, 0, 2),  # protocol 5 pickles this in numpy's 'K' order
        "bool": base > 30,
        "int64": base.astype(np.int64)[::2],
        "zero_size": np.zeros((2, 0), np.float16),
    }
    legacy = {"legacy": ("generated_tensor_0", base[0])}  # paddle 2.1 stored (name, array)
    path = tmp_path / "plain.pdparams"
    name_table = {"StructuredToParameterName@@": {"bool": "generated_tensor_1"}}
    path.write_bytes(pickle.dumps({**arrays, **legacy, **name_table}, protocol=protocol))

    read = read_all(PdparamsFile, path)

    assert list(read) == [*arrays, "legacy"]
    for name, array in arrays.items():
        assert_bits_equal(read[name], array)
    assert_bits_equal(read["legacy"], base[0])


def test_big_endian_pdparams_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "be.pdparams"
    path.write_bytes(pickle.dumps({"w": np.arange(3, dtype=">f4")}, protocol=4))
    with pytest.raises(CorruptCheckpoint, match="big-endian"):
        PdparamsFile(path)


def test_unsupported_opcode_is_named(tmp_path: Path) -> None:
    path = tmp_path / "set.pdparams"
    path.write_bytes(pickle.dumps({"w": frozenset()}, protocol=4))
    with pytest.raises(CorruptCheckpoint, match="opcode .*0x91"):
        PdparamsFile(path)


# --- torch zip against torch -------------------------------------------------------------------


def test_our_torch_bin_loads_in_torch(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    items = sample_tensors()
    path = tmp_path / "pytorch_model-00001-of-00001.bin"
    write_shard(TorchBinShardWriter, path, items)

    for loaded in (torch.load(path, weights_only=True), torch.load(path, mmap=True, weights_only=True)):
        assert list(loaded) == [meta.name for meta, _ in items]
        for meta, array in items:
            assert str(loaded[meta.name].dtype) == f"torch.{meta.dtype}"
            assert_bits_equal(torch_bits(loaded[meta.name]), array)


def test_our_torch_bin_aligns_tensor_data(tmp_path: Path) -> None:
    path = tmp_path / "aligned.bin"
    write_shard(TorchBinShardWriter, path, sample_tensors())
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        data_entries = [info for info in archive.infolist() if "/data/" in info.filename]
        assert archive.namelist()[0] == "archive/data.pkl"
    assert len(data_entries) == len(sample_tensors())
    for info in data_entries:
        name_length, extra_length = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
        assert (info.header_offset + 30 + name_length + extra_length) % 64 == 0


def test_torch_saved_files_read_bit_exactly(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    base = torch.randn(4, 6)
    saved = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "fp16": torch.randn(7).half(),
        "fp32": torch.randn(2, 3, 4),
        "transposed": base.t(),
        "with_offset": base[1:],
        "shares_storage": base[2],
        "whole_storage": base,
        "expanded": torch.randn(3, 1).expand(3, 4),
        "int64": torch.arange(5),
        "parameter": torch.nn.Parameter(torch.randn(2, 2).to(torch.bfloat16)),
    }
    path = tmp_path / "pytorch_model.bin"
    torch.save(saved, path)

    with TorchBinFile(path) as opened:
        metas = opened.tensors()
        assert list(metas) == list(saved)
        assert metas["bf16"].dtype == "bfloat16" and metas["parameter"].dtype == "bfloat16"
        for name, tensor in saved.items():
            assert metas[name].shape == tuple(tensor.shape)
            assert_bits_equal(opened.read(name), torch_bits(tensor))


def test_legacy_torch_file_is_refused(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    path = tmp_path / "legacy.bin"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CorruptCheckpoint, match="zip"):
        TorchBinFile(path)


def test_compressed_tensor_entry_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "stored.bin"
    write_shard(TorchBinShardWriter, path, sample_tensors())
    deflated = tmp_path / "deflated.bin"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
    with pytest.raises(CorruptCheckpoint, match="compressed"):
        TorchBinFile(deflated)


# --- hostile pickles ---------------------------------------------------------------------------


def binunicode(text: str) -> bytes:
    encoded = text.encode()
    return b"X" + struct.pack("<I", len(encoded)) + encoded


def hostile_pickle(target: str, via: str, marker: Path) -> bytes:
    """A protocol-4 pickle of `{"w": target(arg)}` whose call would create `marker`."""
    module, name = target.rsplit(".", 1)
    if via == "GLOBAL":
        callable_ = b"c" + module.encode() + b"\n" + name.encode() + b"\n"
    else:
        callable_ = binunicode(module) + binunicode(name) + b"\x93"  # STACK_GLOBAL
    argument = f"open({str(marker)!r}, 'w').close()" if name == "eval" else f"touch {marker}"
    call = callable_ + binunicode(argument) + b"\x85R"  # TUPLE1, REDUCE
    return b"\x80\x04}" + binunicode("w") + call + b"s."


HOSTILE = [
    (target, via) for target in ("os.system", "builtins.eval", "posix.system") for via in ("GLOBAL", "STACK_GLOBAL")
]


@pytest.mark.parametrize(("target", "via"), HOSTILE)
def test_hostile_pdparams_is_refused_before_anything_runs(tmp_path: Path, target: str, via: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.pdparams"
    path.write_bytes(hostile_pickle(target, via, marker))

    with pytest.raises(UnsafePickle, match=f"'{target}'"):
        PdparamsFile(path)
    assert not marker.exists()

    # the payload is live: a plain unpickler really runs it
    pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize(("target", "via"), HOSTILE)
def test_hostile_torch_data_pkl_is_refused_before_anything_runs(tmp_path: Path, target: str, via: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.bin"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", hostile_pickle(target, via, marker))
        archive.writestr("archive/version", "3\n")

    with pytest.raises(UnsafePickle, match=f"refusing pickle global '{target}' in hostile.bin"):
        TorchBinFile(path)
    assert not marker.exists()


def test_hostile_global_after_valid_tensors_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    valid = io.BytesIO()
    shard = PdparamsShardWriter(valid, [meta for meta, _ in sample_tensors()])
    for meta, array in sample_tensors():
        shard.write(meta, array)
    hostile_entry = hostile_pickle("os.system", "GLOBAL", marker)[len(b"\x80\x04}") :]
    path = tmp_path / "late.pdparams"
    path.write_bytes(valid.getvalue() + hostile_entry)

    with pytest.raises(UnsafePickle, match="'os.system'"):
        PdparamsFile(path)
    assert not marker.exists()


# --- fuzzing: damage surfaces as CorruptCheckpoint, nothing else ----------------------------------


def open_and_read_everything(reader: Reader, path: Path) -> None:
    try:
        with reader(path) as opened:
            for name in opened.tensors():
                opened.read(name)
    except CorruptCheckpoint:
        pass


@st.composite
def damaged(draw: st.DrawFn, originals: dict[str, bytes]) -> bytes:
    data = bytearray(originals[draw(st.sampled_from(sorted(originals)))])
    for position, mask in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(1, 255)), max_size=6)):
        data[position] ^= mask
    if draw(st.booleans()):
        del data[draw(st.integers(0, len(data))) :]
    return bytes(data)


@pytest.fixture(scope="module")
def valid_pdparams(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    path = tmp_path_factory.mktemp("pdparams") / "valid.pdparams"
    write_shard(PdparamsShardWriter, path, sample_tensors()[:3])
    flat = np.arange(10, dtype=np.float16)
    split = {
        "w": np.asfortranarray(np.ones((2, 3), np.float32)),
        "big@@.0": flat[:6],
        "big@@.1": flat[6:],
        "UnpackBigParamInfor@@": {"big": {"OriginShape": (2, 5), "slices": ["big@@.0", "big@@.1"]}},
    }
    return {
        "ours": path.read_bytes(),
        "protocol2_split": pickle.dumps(split, protocol=2),
        "protocol5": pickle.dumps({"w": np.arange(6, dtype=np.int64).reshape(2, 3).T}, protocol=5),
    }


@pytest.fixture(scope="module")
def valid_torch_bins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    torch = pytest.importorskip("torch")
    folder = tmp_path_factory.mktemp("torch")
    write_shard(TorchBinShardWriter, folder / "ours.bin", sample_tensors()[:3])
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    torch.save({"a": base.t(), "b": base[1:], "c": torch.ones(3, dtype=torch.bfloat16)}, folder / "torch.bin")
    return {"ours": (folder / "ours.bin").read_bytes(), "torch": (folder / "torch.bin").read_bytes()}


@FUZZ
@given(data=st.binary(max_size=512), protocol_header=st.sampled_from([b"", b"\x80\x02", b"\x80\x04}"]))
def test_random_bytes_as_pdparams(tmp_path: Path, data: bytes, protocol_header: bytes) -> None:
    path = tmp_path / "random.pdparams"
    path.write_bytes(protocol_header + data)
    open_and_read_everything(PdparamsFile, path)


@FUZZ
@given(data=st.data())
def test_damaged_pdparams(tmp_path: Path, valid_pdparams: dict[str, bytes], data: st.DataObject) -> None:
    path = tmp_path / "damaged.pdparams"
    path.write_bytes(data.draw(damaged(valid_pdparams)))
    open_and_read_everything(PdparamsFile, path)


@FUZZ
@given(data=st.binary(max_size=512), zip_header=st.sampled_from([b"", b"PK\x03\x04"]))
def test_random_bytes_as_torch_bin(tmp_path: Path, data: bytes, zip_header: bytes) -> None:
    path = tmp_path / "random.bin"
    path.write_bytes(zip_header + data)
    open_and_read_everything(TorchBinFile, path)


@FUZZ
@given(data=st.data())
def test_damaged_torch_bin(tmp_path: Path, valid_torch_bins: dict[str, bytes], data: st.DataObject) -> None:
    path = tmp_path / "damaged.bin"
    path.write_bytes(data.draw(damaged(valid_torch_bins)))
    open_and_read_everything(TorchBinFile, path)


@FUZZ
@given(data=st.data())
def test_damaged_torch_data_pkl_in_a_sound_zip(
    tmp_path: Path, valid_torch_bins: dict[str, bytes], data: st.DataObject
) -> None:
    # byte flips in a zip mostly trip its CRC checks; repacking sends the damage into the pickle VM
    original = data.draw(st.sampled_from(sorted(valid_torch_bins)))
    with zipfile.ZipFile(io.BytesIO(valid_torch_bins[original])) as source:
        entries = {info.filename: source.read(info) for info in source.infolist()}
    pickle_name = next(name for name in entries if name.endswith("/data.pkl"))
    entries[pickle_name] = data.draw(damaged({"data.pkl": entries[pickle_name]}))
    path = tmp_path / "repacked.bin"
    with zipfile.ZipFile(path, "w") as target:
        for name, content in entries.items():
            target.writestr(name, content)
    open_and_read_everything(TorchBinFile, path)


# --- laziness and memory -----------------------------------------------------------------------


Result = TypeVar("Result")


def reads_during(action: Callable[[], Result]) -> tuple[Result, int]:
    """What `action` returned, and how many bytes this process read meanwhile (/proc/self/io rchar)."""

    def rchar() -> int:
        line = next(line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar:"))
        return int(line.split()[1])

    before = rchar()
    result = action()
    # reading /proc/self/io itself counts too, but only a few hundred bytes
    return result, rchar() - before


BIG_TENSOR = TensorMeta("big", "float32", (4 * MB, 4))  # 64 MiB
SMALL_TENSOR = TensorMeta("small", "float16", (1000,))


@pytest.fixture(scope="module")
def big_and_small() -> list[tuple[TensorMeta, np.ndarray]]:
    big = np.random.default_rng(3).standard_normal(BIG_TENSOR.shape, dtype=np.float32)
    return [(BIG_TENSOR, big), (SMALL_TENSOR, np.arange(1000, dtype=np.float16))]


@pytest.mark.parametrize(("writer", "reader"), FORMATS)
def test_scanning_is_lazy_and_reads_fetch_one_tensor(
    tmp_path: Path, writer: Writer, reader: Reader, big_and_small: list[tuple[TensorMeta, np.ndarray]]
) -> None:
    if not Path("/proc/self/io").exists():
        pytest.skip("needs /proc/self/io")
    path = tmp_path / "big.ckpt"
    write_shard(writer, path, big_and_small)
    assert path.stat().st_size > 64 * MB

    checkpoint, scanned = reads_during(lambda: reader(path))
    with checkpoint:
        assert list(checkpoint.tensors()) == ["big", "small"]
        small, small_reads = reads_during(lambda: checkpoint.read("small"))
        big, big_reads = reads_during(lambda: checkpoint.read("big"))

    assert_bits_equal(small, big_and_small[1][1])
    assert_bits_equal(big, big_and_small[0][1])
    assert big_reads >= BIG_TENSOR.nbytes  # the probe does see tensor reads
    assert scanned < 256 * KB
    assert small_reads < SMALL_TENSOR.nbytes + 256 * KB  # (it may come partly from the read buffer)


def test_protocol2_text_payloads_are_not_read_while_scanning(tmp_path: Path) -> None:
    if not Path("/proc/self/io").exists():
        pytest.skip("needs /proc/self/io")
    array = np.random.default_rng(4).integers(0, 1 << 16, size=4 * MB, dtype=np.uint16)  # 8 MiB as latin-1 text
    path = tmp_path / "protocol2.pdparams"
    path.write_bytes(pickle.dumps({"w": array, "b": np.ones(3, np.float32)}, protocol=2))

    checkpoint, scanned = reads_during(lambda: PdparamsFile(path))
    with checkpoint:
        assert_bits_equal(checkpoint.read("w"), array)
        assert_bits_equal(checkpoint.read("b"), np.ones(3, np.float32))

    assert scanned < 256 * KB


@pytest.mark.parametrize(("writer", "reader"), FORMATS)
def test_peak_memory_is_about_one_tensor(
    tmp_path: Path, writer: Writer, reader: Reader, big_and_small: list[tuple[TensorMeta, np.ndarray]]
) -> None:
    path = tmp_path / "big.ckpt"
    tracemalloc.start()
    try:
        write_shard(writer, path, big_and_small)
        _, write_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        with reader(path) as checkpoint:
            big = checkpoint.read("big")
            _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert write_peak < 8 * MB  # the array goes to disk without a bytes copy
    assert BIG_TENSOR.nbytes <= read_peak < BIG_TENSOR.nbytes + 8 * MB
    assert_bits_equal(big, big_and_small[0][1])
