"""`vlhub keys`: renamed keys with byte-identical data in safetensors and pdparams, checked by the reference
libraries; layouts, refusals, dry runs, atomic --in-place, and a memory bound that would catch a full read (the
rename rules on key names alone: tests/unit/test_rename_rules.py)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import vlhub.keys
from tests.helpers import REPO, one_line_error, run_vlhub
from vlhub import atomic
from vlhub.check import check_path
from vlhub.errors import UserError
from vlhub.formats.io_utils import StoredBytes
from vlhub.formats.pdparams_io import PdparamsFile, PdparamsShardWriter
from vlhub.formats.readers import open_checkpoint
from vlhub.formats.tensors import TensorMeta, bf16_bits_from_float32
from vlhub.formats.writers import CheckpointWriter
from vlhub.hub.store import manifest_problems
from vlhub.keys import RenameResult, rename_keys
from vlhub.manifest import MANIFEST, Manifest
from vlhub.targets import prepare_conversion

MB = 1 << 20


def _sample_tensors() -> dict[str, tuple[str, np.ndarray]]:
    """Qwen-VL-style names (the visual tower repeats `transformer`) in every dtype shape the writers meet."""
    rng = np.random.default_rng(0)
    values = rng.standard_normal(4096).astype(np.float32)
    return {
        "transformer.wte.weight": ("bfloat16", bf16_bits_from_float32(values[:1024]).reshape(64, 16)),
        "transformer.h.0.ln_1.weight": ("float32", values[:16].copy()),
        "transformer.h.0.attn.c_attn.weight": ("float16", values[:768].astype(np.float16).reshape(48, 16)),
        "transformer.visual.transformer.resblocks.0.attn.in_proj.weight": ("float32", values[:48].reshape(12, 4)),
        "transformer.ln_f.weight": ("float32", values[16:32].copy()),
        "lm_head.weight": ("bfloat16", bf16_bits_from_float32(values[1024:2048]).reshape(64, 16)),
        "logit_scale": ("float32", np.array(values[0])),
    }


def _make_checkpoint(directory: Path, fmt: str, *, max_shard_size: int | None = None) -> Path:
    """A checkpoint directory with weights (sharded when `max_shard_size` is small) and the files beside them."""
    tensors = _sample_tensors()
    metas = [TensorMeta(name, dtype, array.shape) for name, (dtype, array) in tensors.items()]
    metadata = {"format": "pt"} if fmt == "safetensors" else None
    with CheckpointWriter(directory, fmt, metas, max_shard_size=max_shard_size, metadata=metadata) as writer:
        for name, (_, array) in tensors.items():
            writer.write(name, array)
    (directory / "config.json").write_text(json.dumps({"model_type": "qwen"}))
    (directory / "qwen.tiktoken").write_text("tokens\n")
    (directory / "processor").mkdir()
    (directory / "processor" / "preprocessor_config.json").write_text("{}")
    (directory / ".cache").mkdir()
    (directory / ".cache" / "download.lock").write_text("stale")
    return directory


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _data_section(path: Path) -> bytes:
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    return raw[8 + header_len:]


QWEN = [("transformer.", "qwen.")]
TRANSFORMERS5 = [("visual.", "model.visual."), ("model.", "model.language_model.")]


def _rename(source: Path, **options: object) -> RenameResult:
    """QWEN on the sample, which leaves its names in no layout (`qwen.visual.*`): these tests are about bytes."""
    return rename_keys(source, QWEN, allow_unknown_layout=True, **options)  # type: ignore[arg-type]


def _transformers5(name: str) -> str:
    """The transformers >= 4.52 name of an official Qwen2-VL name."""
    for old, new in TRANSFORMERS5:
        if name.startswith(old):
            return new + name[len(old):]
    return name


# --- safetensors -------------------------------------------------------------------------------


def test_sharded_safetensors_out_copies_data_verbatim(tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "renamed"
    result = rename_keys(tiny_qwen2_vl, TRANSFORMERS5, out=out)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    source_index = json.loads((tiny_qwen2_vl / "model.safetensors.index.json").read_text())
    renamed = {_transformers5(k): v for k, v in source_index["weight_map"].items()}
    assert index == {**source_index, "weight_map": renamed}
    assert sorted(p.name for p in result.written) == sorted(set(source_index["weight_map"].values())) + [
        "model.safetensors.index.json"]
    assert len(result.renamed) == sum(k != _transformers5(k) for k in source_index["weight_map"])
    assert (result.family, result.layout) == ("qwen2_vl", "transformers-5")
    new_name = dict(result.renamed)
    for shard in set(source_index["weight_map"].values()):
        assert _data_section(out / shard) == _data_section(tiny_qwen2_vl / shard)
        before, after = load_file(tiny_qwen2_vl / shard), load_file(out / shard)  # the reference reader
        assert sorted(after) == sorted(new_name.get(name, name) for name in before)
        for name, tensor in before.items():
            renamed_tensor = after[new_name.get(name, name)]
            assert renamed_tensor.dtype == tensor.dtype and torch.equal(renamed_tensor, tensor)
    for name in ("config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (tiny_qwen2_vl / name).read_bytes()
        assert (out / name).stat().st_ino != (tiny_qwen2_vl / name).stat().st_ino  # a copy: edits stay apart


def test_single_safetensors_file_keeps_metadata(tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    shard = tiny_qwen2_vl / "model-00002-of-00004.safetensors"
    out = tmp_path / "one.safetensors"
    result = rename_keys(shard, [("model.", "model.language_model.")], out=out)
    assert result.written == [out] and result.copied == []
    assert _data_section(out) == _data_section(shard)
    with safe_open(out, "pt") as renamed, safe_open(shard, "pt") as original:
        assert renamed.metadata() == original.metadata() == {"format": "pt"}
        original_names = list(original.keys())
        assert list(renamed.keys()) == sorted(dict(result.renamed).get(k, k) for k in original_names)


def test_directory_out_carries_other_files_but_not_hidden_ones(tmp_path: Path) -> None:
    source = _make_checkpoint(tmp_path / "src", "safetensors")
    result = _rename(source, out=tmp_path / "out")
    assert sorted(_files(tmp_path / "out")) == ["config.json", "model.safetensors", "processor/preprocessor_config.json",
                                                "qwen.tiktoken"]
    assert sorted(p.name for p in result.copied) == ["config.json", "preprocessor_config.json", "qwen.tiktoken"]
    assert _data_section(tmp_path / "out" / "model.safetensors") == _data_section(source / "model.safetensors")


def test_kernel_copy_refused_falls_back_to_a_buffered_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _make_checkpoint(tmp_path / "src", "safetensors", max_shard_size=3000)

    def cross_device(*args: object) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", cross_device)
    _rename(source, out=tmp_path / "out")
    for shard in json.loads((source / "model.safetensors.index.json").read_text())["weight_map"].values():
        assert _data_section(tmp_path / "out" / shard) == _data_section(source / shard)


# --- pdparams ----------------------------------------------------------------------------------


@pytest.mark.parametrize("max_shard_size", [None, 3000], ids=["single", "sharded"])
def test_pdparams_renamed_and_bit_equal_in_paddle(tmp_path: Path, max_shard_size: int | None) -> None:
    paddle = pytest.importorskip("paddle")
    source = _make_checkpoint(tmp_path / "src", "pdparams", max_shard_size=max_shard_size)
    result = _rename(source, out=tmp_path / "out")

    with open_checkpoint(source) as before:
        shards = before.shards
        index_file = before.index_file
    assert len(shards) == (1 if max_shard_size is None else 3) and (index_file is None) == (max_shard_size is None)
    loaded: dict[str, np.ndarray] = {}
    for shard in shards:
        loaded.update(paddle.load(str(tmp_path / "out" / shard), return_numpy=True))
    expected = {name.replace("transformer.", "qwen.", 1): array for name, (_, array) in _sample_tensors().items()}
    assert list(loaded) == list(expected)
    for name, array in expected.items():
        assert loaded[name].dtype == array.dtype and loaded[name].tobytes() == array.tobytes(), name
    if index_file:
        weight_map = json.loads((tmp_path / "out" / index_file).read_text())["weight_map"]
        assert set(weight_map) == set(expected) and set(weight_map.values()) == set(shards)
    assert len(result.renamed) == 5 and result.unchanged == 2


@pytest.fixture(scope="module")
def qwen_vl_paddle(vlhub_home: Path, module_tmp: Callable[[str], Path]) -> Path:
    """tiny-qwen-vl converted to PaddleMIX's layout (transformer.llm.*, visual.vit.*), with vlhub's manifest."""
    out = module_tmp("qwen-vl") / "paddle"
    prepare_conversion("tiny-qwen-vl", to="paddle").write(out)
    return out


def _copy_with_smoke_verdict(source: Path, target: Path) -> Path:
    """A copy of a converted checkpoint whose manifest records a passed smoke test, as `vlhub convert` leaves it."""
    shutil.copytree(source, target)
    manifest = json.loads((target / MANIFEST).read_text())
    (target / MANIFEST).write_text(json.dumps({**manifest, "smoke": {"passed": True}}))
    return target


def test_a_rename_to_no_layout_is_refused_naming_the_rename_that_gives_one(qwen_vl_paddle: Path,
                                                                           tmp_path: Path) -> None:
    source = shutil.copytree(qwen_vl_paddle, tmp_path / "src")
    before = _files(source)
    # PaddleMIX's old README step, on its current layout, would write qwen.llm.h.N.*, which no loader reads
    line = one_line_error(run_vlhub("keys", str(source), "--rename", "transformer=qwen", "--in-place"))
    assert line == ("error: --rename transformer=qwen would leave the keys in no qwen_vl layout (qwen.llm.wte.weight "
                    "where paddle-inference has qwen.wte.weight; --rename transformer.llm.=qwen. gives the "
                    "paddle-inference layout); pass --allow-unknown-layout to write them anyway")
    assert _files(source) == before
    suggested = re.search(r"; (--rename .*) gives the paddle-inference layout", line).group(1).split()  # type: ignore
    result = run_vlhub("keys", str(source), *suggested, "--in-place", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["layout"] == "paddle-inference"


@pytest.mark.parametrize(
    ("source", "renames", "message"),
    [
        ("paddlemix", ["transformer.llm.h.=qwen.h."],  # half done: qwen.h.N with transformer.llm.wte
         "transformer.llm.wte.weight where paddle-inference has qwen.wte.weight; --rename transformer.llm.=qwen. "
         "gives the paddle-inference layout"),
        ("official", ["model.=model.language_model."],  # the vision tower forgotten
         "visual.patch_embed.proj.weight where transformers-5 has model.visual.patch_embed.proj.weight; "
         "--rename visual.=model.visual. --rename model.=model.language_model. gives the transformers-5 layout"),
        ("official", ["model.=llm."], "llm.embed_tokens.weight where official has model.embed_tokens.weight; "
                                      "keep the official names"),
        ("paddle", ["model.=model.language_model.", "visual.=model.visual."],  # names that need torch's orientation
         "model.visual.patch_embed.proj.weight where paddlemix has visual.patch_embed.proj.weight; keep the paddlemix "
         "names: no other qwen2_vl layout stores the weights as paddlemix does (vlhub convert transposes them)"),
    ],
)
def test_refusals_name_the_nearest_layout(qwen_vl_paddle: Path, tiny_qwen2_vl: Path, tmp_path: Path, source: str,
                                          renames: list[str], message: str) -> None:
    path = {"paddlemix": qwen_vl_paddle, "official": tiny_qwen2_vl}.get(source)
    if path is None:
        path = tmp_path / "qwen2-vl-paddle"
        prepare_conversion("tiny-qwen2-vl", to="paddle").write(path)
    args = [arg for rename in renames for arg in ("--rename", rename)]
    line = one_line_error(run_vlhub("keys", str(path), *args, "--dry-run"))
    assert f"({message}); pass --allow-unknown-layout to write them anyway" in line


def test_allow_unknown_layout_writes_it_and_the_manifest_says_so(qwen_vl_paddle: Path, tmp_path: Path) -> None:
    source = _copy_with_smoke_verdict(qwen_vl_paddle, tmp_path / "src")
    result = run_vlhub("keys", str(source), "--rename", "transformer=qwen", "--in-place", "--allow-unknown-layout")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("renamed 18 keys (43 unchanged), in no qwen_vl layout (--allow-unknown-layout)")
    with open_checkpoint(source) as checkpoint:
        assert "qwen.llm.h.0.ln_1.weight" in checkpoint.tensors
    manifest = Manifest.read(source)
    assert manifest is not None and manifest_problems(source, manifest) == []
    assert manifest.target.layout == "unknown" and manifest.smoke is None  # no loader finds these keys

    # from keys in no layout, vlhub cannot tell which rename was meant, but takes one that gives a layout
    line = one_line_error(run_vlhub("keys", str(source), "--rename", "qwen.llm.=q.", "--dry-run"))
    assert line.endswith("(the source's keys match none of official, paddlemix, paddle-inference either, so vlhub "
                         "cannot say which rename would give one); pass --allow-unknown-layout to write them anyway")
    result = run_vlhub("keys", str(source), "--rename", "qwen.llm.=qwen.", "--in-place", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["layout"] == "paddle-inference"
    assert Manifest.load(source).target.layout == "paddle-inference"


@pytest.mark.parametrize("mode", ["in-place", "out"])
def test_the_manifest_describes_the_renamed_weights(qwen_vl_paddle: Path, tmp_path: Path, mode: str) -> None:
    source = _copy_with_smoke_verdict(qwen_vl_paddle, tmp_path / "src")
    original = Manifest.load(source)
    target = source if mode == "in-place" else tmp_path / "out"
    result = rename_keys(source, [("transformer.llm.", "qwen.")], in_place=mode == "in-place",
                         out=None if mode == "in-place" else target)
    assert (result.family, result.layout) == ("qwen_vl", "paddle-inference")
    assert sorted(p.name for p in result.written) == ["model_state.pdparams", MANIFEST]
    manifest = Manifest.load(target)
    assert manifest_problems(target, manifest) == []  # every sha256 and size is the new one
    assert manifest.to_json()["target"] == {**original.to_json()["target"], "layout": "paddle-inference"}
    assert manifest.smoke == {"passed": True}  # the same tensors under the names their loader reads


README_RECIPE = [
    "vlhub convert tiny-qwen-vl --to paddle --dtype float16 --out ./qwen-vl-paddle",
    "vlhub keys ./qwen-vl-paddle --rename transformer.llm.=qwen. --dry-run",
    "vlhub keys ./qwen-vl-paddle --rename transformer.llm.=qwen. --in-place",
    "vlhub check ./qwen-vl-paddle --target paddle-inference",
]


@pytest.fixture(scope="module")
def readme_recipe(vlhub_home: Path, module_tmp: Callable[[str], Path]) -> tuple[Path, list]:
    """The recipe's directory and each command's result; the commands stop at the first that fails."""
    directory = module_tmp("recipe")
    results = []
    with contextlib.chdir(directory):
        for command in README_RECIPE:
            results.append(run_vlhub(*shlex.split(command)[1:]))
            if results[-1].returncode != 0:
                break
    return directory, results


def test_readme_recipe_writes_paddlenlp_inference_keys(readme_recipe: tuple[Path, list]) -> None:
    directory, results = readme_recipe
    for command, result in zip(README_RECIPE[:3], results):
        assert result.returncode == 0, (command, result.stderr)
    assert "18 keys renamed, 43 unchanged, in the qwen_vl paddle-inference layout" in results[1].stdout
    report = check_path(directory / "qwen-vl-paddle", target="paddle")
    statuses = {check.name: check.status for check in report.checks}
    # the manifest follows the rename, and the float16 PaddleNLP's QWenInferenceModel needs (not bf16)
    assert {name: statuses[name] for name in ("manifest", "file hashes", "stray files", "dtype", "smoke test")} == {
        "manifest": "pass", "file hashes": "pass", "stray files": "pass", "dtype": "pass", "smoke test": "pass"}
    with open_checkpoint(directory / "qwen-vl-paddle") as checkpoint:
        assert {"qwen.wte.weight", "qwen.h.1.mlp.c_proj.weight", "qwen.ln_f.weight", "lm_head.weight",
                "visual.vit.conv1.weight"} <= set(checkpoint.tensors)


def test_readme_recipe_passes_check_for_paddle_inference(readme_recipe: tuple[Path, list]) -> None:
    _, results = readme_recipe
    assert len(results) == len(README_RECIPE) and results[-1].returncode == 0, results[-1].stderr


def test_torch_bin_is_refused(tiny_qwen_vl: Path) -> None:
    line = one_line_error(run_vlhub("keys", str(tiny_qwen_vl), "--rename", "transformer=qwen", "--dry-run"))
    assert "safetensors and pdparams" in line and "not torch" in line


# --- destinations, dry run, in place -----------------------------------------------------------


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    source = _make_checkpoint(tmp_path / "src", "pdparams", max_shard_size=3000)
    before = sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    result = _rename(source, out=tmp_path / "out", dry_run=True)
    assert result.written == [] and len(result.renamed) == 5
    assert _rename(source, dry_run=True).destination is None
    table = run_vlhub("keys", str(source), "--rename", "transformer.=qwen.", "--in-place", "--dry-run",
                      "--allow-unknown-layout")
    assert table.returncode == 0, table.stderr
    assert "transformer.wte.weight" in table.stdout and "qwen.wte.weight" in table.stdout
    assert "5 keys renamed, 2 unchanged, in no qwen_vl layout (--allow-unknown-layout); nothing written" in table.stdout
    assert sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before


def test_destination_refusals_write_nothing(tmp_path: Path) -> None:
    source = _make_checkpoint(tmp_path / "src", "safetensors")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    before = _files(tmp_path)
    cases = [
        ({"out": tmp_path / "o", "in_place": True}, "exclude each other"),
        ({}, "say where to write"),
        ({"out": tmp_path / "taken"}, "exists and is not empty; pass --overwrite"),
        ({"out": source}, "is or contains the source"),
        ({"out": tmp_path}, "is or contains the source"),
        ({"out": source / "renamed"}, "is inside SRC"),
        ({"out": tmp_path / "taken" / "keep.txt"}, "exists and is not a directory"),
    ]
    for options, message in cases:
        with pytest.raises(UserError, match=message):
            _rename(source, **options)
    with pytest.raises(UserError, match="is one shard of"):
        sharded = _make_checkpoint(tmp_path / "sharded", "safetensors", max_shard_size=3000)
        before = _files(tmp_path)
        _rename(sharded / "model-00001-of-00003.safetensors", in_place=True)
    assert _files(tmp_path) == before


def test_overwrite_replaces_the_old_output(tmp_path: Path) -> None:
    source = _make_checkpoint(tmp_path / "src", "safetensors")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.safetensors").write_text("old")
    _rename(source, out=tmp_path / "out", overwrite=True)
    assert "stale.safetensors" not in _files(tmp_path / "out") and "model.safetensors" in _files(tmp_path / "out")
    assert not [p for p in tmp_path.iterdir() if ".vlhub-" in p.name]


@pytest.mark.parametrize("fmt", ["safetensors", "pdparams"])
def test_in_place_rewrites_shards_and_index(tmp_path: Path, fmt: str) -> None:
    source = _make_checkpoint(tmp_path / "src", fmt, max_shard_size=3000)
    names_before = sorted(p.name for p in source.iterdir())
    with open_checkpoint(source) as checkpoint:
        original = {name: checkpoint.read(name) for name in checkpoint.tensors}
    result = _rename(source, in_place=True)
    assert sorted(p.name for p in source.iterdir()) == names_before  # same shard names, no temporaries
    assert result.destination == source and len(result.written) == 4
    with open_checkpoint(source) as checkpoint:
        for name, array in original.items():
            assert checkpoint.read(name.replace("transformer.", "qwen.", 1)).tobytes() == array.tobytes()


@pytest.mark.parametrize("fmt", ["safetensors", "pdparams"])
def test_in_place_interrupted_while_writing_leaves_the_original(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    source = _make_checkpoint(tmp_path / "src", fmt, max_shard_size=3000)
    before = _files(source)
    target = "copy_stored_bytes" if fmt == "safetensors" else "_write_pdparams"
    real = getattr(vlhub.keys, target)
    calls = []

    def interrupted_on_second_shard(*args: object) -> None:
        calls.append(args)
        if len(calls) == 2:
            args[-2].write(b"partial")  # the stream: the second shard's temporary is half written
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(vlhub.keys, target, interrupted_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        _rename(source, in_place=True)
    assert _files(source) == before
    assert not [p for p in source.rglob("*") if ".vlhub-" in p.name]


def test_ctrl_c_during_the_commit_waits_for_it_to_finish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _make_checkpoint(tmp_path / "src", "safetensors", max_shard_size=3000)
    real_exchange = atomic.exchange

    def exchange_after_ctrl_c(first: Path, second: Path) -> bool:
        os.kill(os.getpid(), signal.SIGINT)  # held back until the new folder is in
        return real_exchange(first, second)

    # a thread that does not mask signals, as native pools started by imports do: the kernel may hand it the
    # SIGINT, so masking the main thread alone would not hold it back
    idle = threading.Event()
    bystander = threading.Thread(target=idle.wait)
    bystander.start()
    monkeypatch.setattr(atomic, "exchange", exchange_after_ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt):
            _rename(source, in_place=True)
    finally:
        monkeypatch.undo()
        idle.set()
        bystander.join()
    with open_checkpoint(source) as checkpoint:  # the index and every shard are the new ones
        assert len(checkpoint.tensors) == 7 and all(not n.startswith("transformer.") for n in checkpoint.tensors)
    assert not [p for p in source.rglob("*") if ".vlhub-" in p.name]


# --- command line ------------------------------------------------------------------------------


def test_cli_writes_and_reports_json(tmp_path: Path) -> None:
    source = _make_checkpoint(tmp_path / "src", "safetensors", max_shard_size=3000)
    result = run_vlhub("keys", str(source), "--rename", "transformer.visual.=visual.", "--rename", "transformer.=qwen.",
                       "--rename", "lm_head=output", "--out", str(tmp_path / "out"), "--json", "--allow-unknown-layout")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert ["transformer.wte.weight", "qwen.wte.weight"] in report["renamed"]
    assert ["lm_head.weight", "output.weight"] in report["renamed"]
    assert report["unchanged"] == 1 and report["destination"] == str(tmp_path / "out")
    assert len(report["written"]) == 4 and len(report["copied"]) == 3
    text = run_vlhub("keys", str(source), "--rename", "lm_head=output", "--out", str(tmp_path / "out2"),
                     "--allow-unknown-layout")
    assert text.stdout.startswith("renamed 1 key (6 unchanged), in no qwen_vl layout")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dry-run"], "at least one --rename"),
        (["--rename", "transformer", "--dry-run"], "expected OLD=NEW"),
        (["--rename", "(x=y", "--regex", "--dry-run"], "bad regex"),
        (["--rename", "transfomer.=qwen.", "--dry-run"], "matches no key"),
        (["--rename", "transformer.ln_f.=lm_head.", "--dry-run"], "'lm_head.weight' (not renamed) would both"),
        (["--rename", "transformer.=qwen."], "say where to write"),
        (["--rename", "transformer.=qwen.", "--in-place", "--out", "elsewhere"], "exclude each other"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    source = _make_checkpoint(tmp_path / "src", "safetensors")
    before = _files(tmp_path)
    assert message in one_line_error(run_vlhub("keys", str(source), *args))
    assert _files(tmp_path) == before


# --- memory ------------------------------------------------------------------------------------


BIG = 256 * MB
HARNESS = REPO / "benchmarks" / "_harness.py"


def _peak_rss(argv: list[str]) -> int:
    """Peak resident memory of `argv` (which must succeed), started by the benchmark harness from a fresh
    interpreter: a child forked from this test process would inherit its peak (paddle and torch are loaded)."""
    result = subprocess.run([sys.executable, str(HARNESS), *argv], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return int(result.stderr.split()[-1])


def test_renaming_a_256mb_pdparams_tensor_never_holds_it(tmp_path: Path) -> None:
    zeros = tmp_path / "zeros.bin"
    with open(zeros, "wb") as file:
        file.truncate(BIG)  # sparse: the source is made without 256 MB in this process either
    source = tmp_path / "big.pdparams"
    meta = TensorMeta("model.big.weight", "float32", (BIG // 4,))
    with open(source, "wb") as stream:
        writer = PdparamsShardWriter(stream, [meta])
        writer.write(meta, StoredBytes(zeros, 0, BIG))
        writer.finish()
    command = [sys.executable, "-m", "vlhub", "keys", str(source), "--rename", "model.=llm."]

    baseline = _peak_rss([*command, "--dry-run"])  # the same process without copying any data
    renamed = _peak_rss([*command, "--out", str(tmp_path / "out.pdparams")])
    # the control: the same command made to read the tensor instead of copying it, which must show
    forced_read = ("import sys; from vlhub.formats.pdparams_io import PdparamsFile\n"
                   "PdparamsFile.stored_bytes = lambda self, name: None\n"
                   "from vlhub.cli.app import main; sys.argv[0] = 'vlhub'; main()")
    full_read = _peak_rss([sys.executable, "-c", forced_read, *command[3:], "--out", str(tmp_path / "read.pdparams")])

    assert renamed - baseline < 48 * MB, (baseline, renamed)
    assert full_read - baseline > BIG * 3 // 4, (baseline, full_read)
    with PdparamsFile(tmp_path / "out.pdparams") as out:
        assert out.tensors()["llm.big.weight"].shape == (BIG // 4,)
        assert out.stored_bytes("llm.big.weight").length == BIG


def test_in_place_refuses_a_shared_catalog_copy(tiny_qwen2_vl: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in tiny_qwen2_vl.iterdir()}
    result = run_vlhub("keys", "tiny-qwen2-vl", "--rename", "model.=llm.", "--in-place")
    assert result.returncode == 2 and "--in-place needs a directory you own" in result.stderr
    assert {p.name: p.stat().st_mtime_ns for p in tiny_qwen2_vl.iterdir()} == before
