"""`vlhub dump-embeddings`: byte-identical tables in every layout, format and dtype, streaming, and every refusal.

The reference for every output is what the issue asks for ("read the table, cast with round-to-nearest-even,
tofile"), made with safetensors/torch straight from the official tiny checkpoint, independent of vlhub's
readers and casts: each layout is a lossless re-encoding of it, so all must dump the same bytes.
"""

from __future__ import annotations

import json
import re
import tracemalloc
from functools import cache
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import run_vlhub
from vlhub.catalog import get_model
from vlhub.embeddings import DTYPES, prepare_dump
from vlhub.errors import UserError
from vlhub.formats.readers import Checkpoint
from vlhub.formats.tensors import TensorMeta
from vlhub.formats.writers import CheckpointWriter, file_sha256
from vlhub.hub.tiny import ensure_tiny_model
from vlhub.keys import rename_keys
from vlhub.targets import prepare_conversion

torch = pytest.importorskip("torch")

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TRANSFORMERS5 = [("visual.", "model.visual."), ("model.", "model.language_model.")]
# (model, layout) -> the embedding's name there: the spec, written out
EMBEDDING_NAMES = {
    ("tiny-qwen2-vl", "official"): "model.embed_tokens.weight",
    ("tiny-qwen2-vl", "transformers-5"): "model.language_model.embed_tokens.weight",
    ("tiny-qwen2-vl", "paddlemix"): "model.embed_tokens.weight",
    ("tiny-qwen2.5-vl", "official"): "model.embed_tokens.weight",
    ("tiny-qwen2.5-vl", "transformers-5"): "model.language_model.embed_tokens.weight",
    ("tiny-qwen2.5-vl", "paddlemix"): "model.embed_tokens.weight",
    ("tiny-qwen-vl", "official"): "transformer.wte.weight",
    ("tiny-qwen-vl", "paddlemix"): "transformer.llm.wte.weight",
    ("tiny-qwen-vl", "paddle-inference"): "qwen.wte.weight",
}
CASES = list(EMBEDDING_NAMES)
OFFICIAL_EMBEDDING = {"tiny-qwen2-vl": "model.embed_tokens.weight", "tiny-qwen2.5-vl": "model.embed_tokens.weight",
                      "tiny-qwen-vl": "transformer.wte.weight"}
TIED = {"tiny-qwen2-vl": False, "tiny-qwen2.5-vl": True, "tiny-qwen-vl": False}


@pytest.fixture(scope="module")
def layout_source(vlhub_home: Path, module_tmp: Callable[[str], Path]):
    """A function giving SRC for (model, layout): the catalog name for official, else a directory made once."""
    root = module_tmp("layouts")

    @cache
    def make(model: str, layout: str) -> str:
        out = root / f"{model}-{layout}"
        if layout == "official":
            return model
        if layout == "transformers-5":
            rename_keys(model_dir(model), TRANSFORMERS5, out=out)
        elif layout == "paddlemix":
            prepare_conversion(model, to="paddle").write(out)
        elif layout == "paddle-inference":
            rename_keys(Path(make(model, "paddlemix")), [("transformer.llm.", "qwen.")], out=out)
        return str(out)

    return make


def model_dir(model: str) -> Path:
    return ensure_tiny_model(get_model(model))


@cache
def official_tensor(model: str, name: str) -> torch.Tensor:
    """One tensor of the official tiny checkpoint, read by safetensors or torch (not by vlhub)."""
    directory = model_dir(model)
    index = next(directory.glob("*.index.json"))
    shard = directory / json.loads(index.read_text())["weight_map"][name]
    if shard.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(shard, "pt") as file:
            return file.get_tensor(name)
    return torch.load(shard, weights_only=True)[name]


@cache
def reference(model: str, name: str, dtype: str) -> bytes:
    """The table cast by torch (round to nearest even), as `tofile` writes it."""
    cast = official_tensor(model, name).to(TORCH_DTYPES[dtype]).contiguous()
    return (cast.view(torch.int16) if dtype == "bfloat16" else cast).numpy().tobytes()


def lm_head_reference(model: str, dtype: str) -> bytes:
    return reference(model, OFFICIAL_EMBEDDING[model] if TIED[model] else "lm_head.weight", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("model", "layout"), CASES)
def test_table_is_byte_identical_to_torch_cast_and_tofile(
        layout_source, tmp_path: Path, model: str, layout: str, dtype: str) -> None:
    out = tmp_path / "embed_tokens.bin"
    dump = prepare_dump(layout_source(model, layout), out=out, dtype=dtype)
    assert dump.layout == layout
    [dumped] = dump.write()
    assert dumped.path == out and out.read_bytes() == reference(model, OFFICIAL_EMBEDDING[model], dtype)
    info = json.loads((tmp_path / "embed_tokens.json").read_text())
    assert info == dumped.info
    assert info["shape"] == [151936, 128] and info["dtype"] == dtype and info["format"] == "bin"
    assert info["tensor"] == EMBEDDING_NAMES[model, layout] and info["transposed"] is False
    assert info["source"]["layout"] == layout and info["source"]["dtype"] == "bfloat16"
    assert info["sha256"] == file_sha256(out) and info["size"] == out.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embed_tokens.bin", "embed_tokens.json"]


@pytest.mark.parametrize(("model", "layout"), CASES)
def test_lm_head_is_the_output_projection_or_the_tied_embedding(
        layout_source, tmp_path: Path, model: str, layout: str) -> None:
    [table, head] = prepare_dump(layout_source(model, layout), out=tmp_path / "embed_tokens.bin", lm_head=True).write()
    assert table.path.read_bytes() == reference(model, OFFICIAL_EMBEDDING[model], "float16")
    assert head.path == tmp_path / "lm_head.bin" and head.path.read_bytes() == lm_head_reference(model, "float16")
    info = json.loads((tmp_path / "lm_head.json").read_text())
    assert info["tied"] is TIED[model] and info["role"] == "lm_head" and info["shape"] == [151936, 128]
    # Paddle layouts store an untied lm_head [hidden, vocab]: it is read column block by column block
    assert info["transposed"] is (not TIED[model] and layout.startswith("paddle"))
    assert info["tensor"] == (EMBEDDING_NAMES[model, layout] if TIED[model] else "lm_head.weight")


def test_tensor_option_dumps_the_named_table_in_torch_orientation(layout_source, tmp_path: Path) -> None:
    [dumped] = prepare_dump(layout_source("tiny-qwen-vl", "paddlemix"), out=tmp_path / "head.bin",
                            tensor="lm_head.weight", dtype="float32").write()
    assert dumped.path.read_bytes() == reference("tiny-qwen-vl", "lm_head.weight", "float32")
    assert dumped.info["role"] == "tensor" and dumped.info["transposed"] is True


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_npy_loads_with_numpy_and_holds_the_same_rows(tmp_path: Path, dtype: str) -> None:
    [dumped] = prepare_dump("tiny-qwen2-vl", out=tmp_path / "embed_tokens.npy", dtype=dtype, format="npy").write()
    loaded = np.load(dumped.path)
    assert loaded.dtype == np.dtype(dtype) and loaded.shape == (151936, 128)
    assert loaded.tobytes() == reference("tiny-qwen2-vl", "model.embed_tokens.weight", dtype)
    assert dumped.info["format"] == "npy" and dumped.info["sha256"] == file_sha256(dumped.path)


@pytest.mark.parametrize("layout", ["official", "paddlemix"])
def test_odd_block_sizes_and_unstored_views_give_the_same_bytes(
        layout_source, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    source = layout_source("tiny-qwen2-vl", layout)
    # 259 rows a block: 151936 rows leave a short last block, for rows and (lm_head) columns alike
    (tmp_path / "a").mkdir()
    prepare_dump(source, out=tmp_path / "a" / "e.bin", lm_head=True).write(block_bytes=259 * 256)
    # a tensor with no plain byte range (a pickled view) is read whole, then cut in the same blocks
    monkeypatch.setattr(Checkpoint, "stored_bytes", lambda self, name: None)
    (tmp_path / "b").mkdir()
    prepare_dump(source, out=tmp_path / "b" / "e.bin", lm_head=True).write()
    for directory in ("a", "b"):
        assert (tmp_path / directory / "e.bin").read_bytes() == reference("tiny-qwen2-vl", "model.embed_tokens.weight",
                                                                          "float16")
        assert (tmp_path / directory / "lm_head.bin").read_bytes() == lm_head_reference("tiny-qwen2-vl", "float16")


def test_memory_stays_at_a_few_blocks_whatever_the_vocabulary(tmp_path: Path) -> None:
    dump = prepare_dump("tiny-qwen-vl", out=tmp_path / "e.bin", dtype="float32", lm_head=True)
    assert dump.total_bytes == 2 * 151936 * 128 * 4  # 155.6 MB of float32 rows
    tracemalloc.start()
    try:
        dump.write(block_bytes=256 << 10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak


def test_a_single_weight_file_and_an_output_directory(tmp_path: Path) -> None:
    directory = model_dir("tiny-qwen2-vl")
    shard = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"][
        "model.embed_tokens.weight"]
    [dumped] = prepare_dump(str(directory / shard), out=tmp_path).write()
    assert dumped.path == tmp_path / "embed_tokens.bin"
    assert dumped.path.read_bytes() == reference("tiny-qwen2-vl", "model.embed_tokens.weight", "float16")


def test_default_output_is_embed_tokens_in_the_working_directory(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    [dumped] = prepare_dump("tiny-qwen2.5-vl", format="npy").write()
    assert dumped.path == tmp_path / "embed_tokens.npy" and dumped.sidecar == tmp_path / "embed_tokens.json"


def test_a_failed_dump_leaves_nothing_and_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vlhub import embeddings

    (tmp_path / "embed_tokens.bin").write_bytes(b"old")
    calls = []

    def failing_cast(*args: object, **kwargs: object) -> np.ndarray:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real_cast(*args, **kwargs)

    real_cast = embeddings.cast_float
    monkeypatch.setattr(embeddings, "cast_float", failing_cast)
    dump = prepare_dump("tiny-qwen2-vl", out=tmp_path / "embed_tokens.bin", lm_head=True, overwrite=True)
    with pytest.raises(RuntimeError, match="disk on fire"):
        dump.write(block_bytes=1 << 20)
    assert [p.name for p in tmp_path.iterdir()] == ["embed_tokens.bin"]
    assert (tmp_path / "embed_tokens.bin").read_bytes() == b"old"


def test_cli_writes_both_tables_and_reports_them(tmp_path: Path) -> None:
    result = run_vlhub("dump-embeddings", "tiny-qwen-vl", "--out", str(tmp_path / "vacc" / "embed_tokens.bin"),
                       "--lm-head", "--json")
    assert result.returncode == 2 and "vacc does not exist" in result.stderr  # the directory must exist
    (tmp_path / "vacc").mkdir()
    result = run_vlhub("dump-embeddings", "tiny-qwen-vl", "--out", str(tmp_path / "vacc" / "embed_tokens.bin"),
                       "--lm-head", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [Path(r["path"]).name for r in report] == ["embed_tokens.bin", "lm_head.bin"]
    assert [r["tensor"] for r in report] == ["transformer.wte.weight", "lm_head.weight"]
    assert Path(report[1]["path"]).read_bytes() == lm_head_reference("tiny-qwen-vl", "float16")
    result = run_vlhub("dump-embeddings", "tiny-qwen2.5-vl", "--out", str(tmp_path / "t.bin"), "--lm-head")
    assert result.returncode == 0, result.stderr
    assert "t.bin  (151936 x 128 float16, 38.9 MB; from model.embed_tokens.weight)" in result.stdout
    assert "lm_head.bin  (151936 x 128 float16, 38.9 MB; from model.embed_tokens.weight, tied)" in result.stdout


def _no_embedding(directory: Path) -> str:
    metas = [TensorMeta("encoder.proj.weight", "float32", (8, 4)), TensorMeta("encoder.scale", "float32", (4,))]
    with CheckpointWriter(directory, "safetensors", metas) as writer:
        for meta in metas:
            writer.write(meta.name, np.ones(meta.shape, np.float32))
    return str(directory)


def _untied_without_lm_head(directory: Path) -> str:
    meta = TensorMeta("model.embed_tokens.weight", "bfloat16", (16, 8))
    with CheckpointWriter(directory, "safetensors", [meta]) as writer:
        writer.write(meta.name, np.zeros(meta.shape, np.uint16))
    (directory / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "tie_word_embeddings": False}))
    return str(directory)


def _paddle_bf16_declared_float16(directory: Path) -> str:
    prepare_conversion("tiny-qwen2-vl", to="paddle").write(directory)
    config = json.loads((directory / "config.json").read_text())
    config["dtype"] = "float16"
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory)


BAD_INPUTS = {
    "no embedding": (lambda d: [_no_embedding(d / "src")],
                     # every family's spellings, in the registry's order
                     (r"no embedding table in .*src: looked for (?=.*\btransformer\.wte\.weight)"
                      r"(?=.*transformer\.llm\.wte\.weight)(?=.*qwen\.wte\.weight)(?=.*model\.embed_tokens\.weight)"
                      r"(?=.*model\.language_model\.embed_tokens\.weight).*\(its largest 2-D tensors: "
                      r"encoder\.proj\.weight \[8, 4\]\); name it with --tensor NAME")),
    "tensor not 2-D": (lambda d: ["tiny-qwen2-vl", "--tensor", "model.norm.weight"],
                       r"model\.norm\.weight is \[128\], not a 2-D table"),
    "tensor absent": (lambda d: ["tiny-qwen2-vl", "--tensor", "model.embed.weight"],
                      r"no tensor 'model\.embed\.weight' in .* \(its largest 2-D tensors: model\.embed_tokens\.weight"),
    "missing directory": (lambda d: ["tiny-qwen2-vl", "--out", str(d / "nowhere" / "e.bin")],
                          r"nowhere does not exist: create it first"),
    "unsupported dtype": (lambda d: ["tiny-qwen2-vl", "--dtype", "float64"],
                          r"unsupported --dtype 'float64'; choose one of float16, bfloat16, float32"),
    "unsupported format": (lambda d: ["tiny-qwen2-vl", "--format", "pt"], r"unsupported --format 'pt'"),
    "npy bfloat16": (lambda d: ["tiny-qwen2-vl", "--format", "npy", "--dtype", "bfloat16"],
                     r"numpy has no bfloat16, so --format npy cannot hold it: use --format bin, or --dtype float32"),
    # raw rows named .npy: np.load would refuse them, or a runtime reading .bin would take a header for rows
    "npy name, bin format": (lambda d: ["tiny-qwen2-vl", "--out", str(d / "out" / "embed_tokens.npy")],
                             r"--out embed_tokens\.npy names a \.npy file but --format is bin: pass --format npy, "
                             r"or name it \.bin"),
    "bin name, npy format": (lambda d: ["tiny-qwen2-vl", "--format", "npy", "--out", str(d / "out" / "e.bin")],
                             r"--out e\.bin names a \.bin file but --format is npy"),
    "untied, no lm_head": (lambda d: [_untied_without_lm_head(d / "src"), "--lm-head"],
                           r"no lm_head in .*: looked for lm_head\.weight, and config\.json does not tie it"),
    "uint16 table": (lambda d: [_paddle_bf16_declared_float16(d / "src")],
                     r"model\.embed_tokens\.weight is uint16, not a floating-point table \(how Paddle stores bfloat16"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path: Path, case: str) -> None:
    make_args, message = BAD_INPUTS[case]
    (tmp_path / "out").mkdir()
    args = make_args(tmp_path)
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out" / "embed_tokens.bin")]
    result = run_vlhub("dump-embeddings", *args, "--json")
    assert result.returncode == 2, result.stderr
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: ") and re.search(message, result.stderr), result.stderr
    assert list((tmp_path / "out").iterdir()) == [] and {p.name for p in tmp_path.iterdir()} <= {"out", "src"}


@pytest.mark.parametrize("existing", ["embed_tokens.bin", "embed_tokens.json", "lm_head.bin", "lm_head.json"])
def test_an_existing_output_is_kept_unless_overwrite(tmp_path: Path, existing: str) -> None:
    (tmp_path / existing).write_bytes(b"mine")
    args = ["dump-embeddings", "tiny-qwen2-vl", "--out", str(tmp_path), "--lm-head"]
    result = run_vlhub(*args)
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert result.stderr == (f"error: {tmp_path / existing} exists; pass --overwrite to replace it, or choose "
                             "another --out\n")
    assert [p.name for p in tmp_path.iterdir()] == [existing] and (tmp_path / existing).read_bytes() == b"mine"
    result = run_vlhub(*args, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "embed_tokens.bin").read_bytes() == reference("tiny-qwen2-vl", "model.embed_tokens.weight",
                                                                     "float16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embed_tokens.bin", "embed_tokens.json", "lm_head.bin",
                                                          "lm_head.json"]


def test_library_refusals_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="the .json name is taken by the sidecar"):
        prepare_dump("tiny-qwen2-vl", out=tmp_path / "embed.json")
    with pytest.raises(UserError, match="would collide with the lm_head output"):
        prepare_dump("tiny-qwen2-vl", out=tmp_path / "lm_head.bin", lm_head=True)
    with pytest.raises(UserError, match="new does not exist"):  # a trailing slash names a directory
        prepare_dump("tiny-qwen2-vl", out=f"{tmp_path}/new/")
    empty = TensorMeta("model.embed_tokens.weight", "float32", (0, 8))
    with CheckpointWriter(tmp_path / "empty", "safetensors", [empty]) as writer:
        writer.write(empty.name, np.zeros(empty.shape, np.float32))
    with pytest.raises(UserError, match=r"model\.embed_tokens\.weight is \[0, 8\]: an empty table"):
        prepare_dump(str(tmp_path / "empty"), out=tmp_path)


def test_too_little_disk_is_refused_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vlhub import atomic

    real = atomic.shutil.disk_usage
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: real(p)._replace(free=50_000_000))
    with pytest.raises(UserError, match=r"not enough disk space in .*: the tables need \d+(\.\d+)? MB, 50 MB is free"):
        prepare_dump("tiny-qwen2-vl", out=tmp_path, lm_head=True)
    assert list(tmp_path.iterdir()) == []


def test_an_output_over_the_checkpoints_own_files_is_refused(tiny_qwen2_5_vl: Path, tmp_path: Path) -> None:
    import shutil

    source = tmp_path / "src"
    shutil.copytree(tiny_qwen2_5_vl, source)
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    for out in (source / "model-00001-of-00003.safetensors", source / "config.bin"):
        result = run_vlhub("dump-embeddings", str(source), "--out", str(out))
        assert result.returncode == 2 and "would overwrite the checkpoint's own" in result.stderr
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before
