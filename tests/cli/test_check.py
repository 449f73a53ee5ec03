"""`vlhub check`: every check passes on a good layout and fails, for its own reason, on one broken that way."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import run_vlhub
from vlhub.check import FAIL, PASS, WARN, Report, check_model, check_path
from vlhub.deploy.checks import CONVERT_MEMORY
from vlhub.formats.readers import open_checkpoint
from vlhub.formats.tensors import TensorMeta, bf16_bits_from_float32
from vlhub.formats.writers import CheckpointWriter, file_entry
from vlhub.manifest import MANIFEST

TINY = "tiny-qwen2-vl"


def convert(mktemp: Callable[[str], Path], model: str, to: str, *options: str, smoke: bool = False) -> Path:
    out = mktemp("layout") / to
    result = run_vlhub("convert", model, "--to", to, "--out", str(out), *options, *([] if smoke else ["--no-smoke"]))
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def vamc(module_tmp: Callable[[str], Path]) -> Path:
    return convert(module_tmp, TINY, "vamc")


@pytest.fixture(scope="module")
def tpu(module_tmp: Callable[[str], Path]) -> Path:
    return convert(module_tmp, TINY, "tpu-mlir", "--seq-length", "128", "--max-pixels", "112x112",
                   "--quantize", "bf16")


@pytest.fixture(scope="module")
def paddle_inference(module_tmp: Callable[[str], Path]) -> Path:
    return convert(module_tmp, TINY, "paddle-inference")


@pytest.fixture(scope="module")
def paddle(module_tmp: Callable[[str], Path]) -> Path:
    return convert(module_tmp, TINY, "paddle", smoke=True)  # its smoke verdict recorded


@pytest.fixture(scope="module")
def qwen_vl_inference(module_tmp: Callable[[str], Path]) -> Path:
    return convert(module_tmp, "tiny-qwen-vl", "paddle-inference")


@pytest.fixture
def fake_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PATH holding only stand-ins for vamc, GNU parallel and a Python 3.10 that imports tpu_mlir, torch, psutil;
    tests add to it or point the environment elsewhere."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"vamc": "exit 0", "parallel": "exit 0",
                       "python3.10": 'case "$2" in *version_info*) echo 3.10;; esac\nexit 0'}.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("VLHUB_TPU_MLIR_PYTHON", raising=False)
    return bin_dir


def fake_distribution(root: Path, name: str, version: str) -> None:
    """Metadata importlib.metadata finds first when `root` leads sys.path: a stand-in installed version."""
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def copy(layout: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(layout, tmp_path / layout.name))


def refresh(layout: Path, *names: str) -> None:
    """Record files changed on purpose in the manifest, so only the check under test sees the change."""
    manifest = json.loads((layout / MANIFEST).read_text())
    for name in names:
        manifest["files"][name] = file_entry(layout / name)
    (layout / MANIFEST).write_text(json.dumps(manifest))


def edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def edit_manifest_target(layout: Path, **changes: object) -> None:
    manifest = json.loads((layout / MANIFEST).read_text())
    manifest["target"].update(changes)
    (layout / MANIFEST).write_text(json.dumps(manifest))


def write_at(path: Path, tensor: str, data: bytes) -> None:
    """Overwrite the first bytes of one tensor's data in place."""
    with open_checkpoint(path) as checkpoint:
        stored = checkpoint.stored_bytes(tensor)
    assert stored is not None
    with open(stored.path, "r+b") as file:
        file.seek(stored.offset)
        file.write(data)


def status(report: Report, name: str) -> str:
    found = [check.status for check in report.checks if check.name == name]
    assert len(found) == 1, (name, [c.name for c in report.checks])
    return found[0]


def detail(report: Report, name: str) -> str:
    return next(check.detail for check in report.checks if check.name == name)


def fix(report: Report, name: str) -> str:
    return next(check.fix for check in report.checks if check.name == name)


@pytest.mark.parametrize("layout", ["vamc", "tpu", "paddle_inference", "paddle", "qwen_vl_inference"])
def test_good_layouts_pass(layout: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(layout)
    report = check_path(path)
    checked = [c for c in report.checks if c.group in ("integrity", "weights", "numbers", "resources")]
    assert {c.name for c in checked} >= {"manifest", "file hashes", "stray files", "key layout", "dtype", "shapes",
                                         "tied embeddings", "NaN/Inf"}
    assert [c for c in checked if c.status != PASS] == []
    expected = {"vamc": "vamc", "tpu": "tpu-mlir", "paddle_inference": "paddle-inference", "paddle": "paddle",
                "qwen_vl_inference": "paddle-inference"}[layout]
    assert report.target == expected and report.mode == "layout"


def test_flipped_byte_and_deleted_files(tpu: Path, vamc: Path, tmp_path: Path) -> None:
    flipped = copy(tpu, tmp_path / "a")
    weights = flipped / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-2] ^= 0x01  # a bf16 mantissa bit: a different number, not a NaN
    weights.write_bytes(bytes(data))
    report = check_path(flipped)
    assert status(report, "file hashes") == FAIL
    assert "model/model.safetensors: sha256 differs" in detail(report, "file hashes")
    assert status(report, "NaN/Inf") == PASS and status(report, "manifest") == PASS

    deleted = copy(vamc, tmp_path / "b")
    (deleted / "embed_tokens.bin").unlink()
    (deleted / "weights" / TINY / "config.json").unlink()
    report = check_path(deleted)
    assert status(report, "file hashes") == FAIL
    assert "embed_tokens.bin: missing" in detail(report, "file hashes")
    assert status(report, "weights readable") == FAIL and "config.json" in detail(report, "weights readable")

    (deleted / MANIFEST).unlink()  # the layout's shape still says vamc
    report = check_path(deleted)
    assert report.target == "vamc" and status(report, "manifest") == FAIL


def test_stray_files(paddle: Path, tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    stray = copy(paddle, tmp_path)
    (stray / "notes.txt").write_text("mine")
    report = check_path(stray)
    assert status(report, "stray files") == WARN and "notes.txt" in detail(report, "stray files")
    shutil.copy(next(tiny_qwen2_vl.glob("*.safetensors")), stray / "model.safetensors")
    report = check_path(stray)
    assert status(report, "stray files") == FAIL
    assert "model.safetensors" in detail(report, "stray files")
    assert "safetensors before *.pdparams" in detail(report, "stray files")
    # the weights checks read the pdparams the manifest lists, not the stray file Paddle would pick
    assert status(report, "key layout") == PASS and "pdparams" in detail(report, "key layout")


def test_qwen_vl_bf16_trap(qwen_vl_inference: Path, tmp_path: Path) -> None:
    def rewrite_bf16(layout: Path, config_dtype: str) -> None:
        weights = next(layout.glob("*-inference"))
        with open_checkpoint(weights) as checkpoint:
            metas = [TensorMeta(m.name, "bfloat16", m.shape) for m in checkpoint.tensors.values()]
            with CheckpointWriter(tmp_path / "bf16", "pdparams", metas) as writer:
                for meta in metas:
                    writer.write(meta.name, bf16_bits_from_float32(checkpoint.read(meta.name).astype(np.float32)))
        shutil.move(tmp_path / "bf16" / "model_state.pdparams", weights / "model_state.pdparams")
        edit_json(weights / "config.json", dtype=config_dtype, bf16=config_dtype == "bfloat16",
                  fp16=config_dtype == "float16")
        refresh(layout, *(f"{weights.name}/{name}" for name in ("model_state.pdparams", "config.json")))

    declared = copy(qwen_vl_inference, tmp_path / "declared")
    rewrite_bf16(declared, "bfloat16")  # what PaddleNLP's QWenInferenceModel misreads
    report = check_path(declared)
    assert status(report, "dtype") == FAIL and "16256.0" in detail(report, "dtype")
    assert status(report, "file hashes") == PASS and status(report, "shapes") == PASS

    undeclared = copy(qwen_vl_inference, tmp_path / "undeclared")
    rewrite_bf16(undeclared, "float16")  # bf16 bits under a float16 config: read as numbers by every loader
    report = check_path(undeclared)
    assert status(report, "dtype") == FAIL and "uint16" in detail(report, "dtype")


def test_config_dtype_and_quantize_mismatch(tpu: Path, tmp_path: Path) -> None:
    config_says = copy(tpu, tmp_path / "a")
    edit_json(config_says / "model" / "config.json", torch_dtype="float16")
    refresh(config_says, "model/config.json")
    report = check_path(config_says)
    assert status(report, "dtype") == FAIL
    assert "config.json says float16, the tensors are bfloat16" in detail(report, "dtype")

    quantize = copy(tpu, tmp_path / "b")
    edit_manifest_target(quantize, quantize="f16")
    report = check_path(quantize)
    assert status(report, "dtype") == FAIL and "llm_convert" in detail(report, "dtype")


def test_shapes_tied_and_key_layout(tpu: Path, tmp_path: Path) -> None:
    shapes = copy(tpu, tmp_path / "a")
    edit_json(shapes / "model" / "config.json", intermediate_size=512)  # the tiny model's is 256
    refresh(shapes, "model/config.json")
    report = check_path(shapes)
    assert status(report, "shapes") == FAIL
    assert "mlp.gate_proj.weight is [256, 128], config.json says [512, 128]" in detail(report, "shapes")

    tied = copy(tpu, tmp_path / "b")
    edit_json(tied / "model" / "config.json", tie_word_embeddings=True)
    refresh(tied, "model/config.json")
    report = check_path(tied)
    assert status(report, "tied embeddings") == WARN and "lm_head.weight is stored" in detail(report, "tied embeddings")

    renamed = copy(tpu, tmp_path / "c")  # transformers >= 4.52 names, which llm_convert cannot find
    result = run_vlhub("keys", str(renamed / "model"), "--regex", "--rename", r"^model\.=model.language_model.",
                       "--rename", r"^visual\.=model.visual.", "--in-place")
    assert result.returncode == 0, result.stderr
    refresh(renamed, "model/model.safetensors")
    report = check_path(renamed)
    assert status(report, "key layout") == FAIL
    assert "transformers-5 layout, tpu-mlir's loader reads official" in detail(report, "key layout")


def test_one_unknown_key_is_counted_in_the_singular(tpu: Path, tmp_path: Path) -> None:
    layout = copy(tpu, tmp_path)
    result = run_vlhub("keys", str(layout / "model"), "--rename", "lm_head.weight=extra.weight", "--in-place",
                       "--allow-unknown-layout")
    assert result.returncode == 0, result.stderr
    refresh(layout, "model/model.safetensors")
    report = check_path(layout)
    assert status(report, "key layout") == FAIL
    assert "1 unmatched key (extra.weight)" in detail(report, "key layout")


def test_nan_in_a_tensor(tpu: Path, tmp_path: Path) -> None:
    broken = copy(tpu, tmp_path)
    write_at(broken / "model", "model.norm.weight", b"\xc0\x7f\x80\x7f")  # bf16 NaN, then +Inf
    refresh(broken, "model/model.safetensors")
    report = check_path(broken)
    assert status(report, "NaN/Inf") == FAIL
    assert "2 NaN or Inf values in 1 tensor (model.norm.weight: 2)" in detail(report, "NaN/Inf")
    assert status(report, "file hashes") == PASS


def test_too_short_prefill_and_images(vamc: Path, tpu: Path, paddle_inference: Path, tmp_path: Path) -> None:
    short = copy(vamc, tmp_path)
    llm_yaml = short / "build_in" / "build" / "qwen2_vl_llm.yaml"
    llm = yaml.safe_load(llm_yaml.read_text())
    llm["frontend"]["shape"]["input_ids"] = [[1024], [1920]]  # below the 1280 visual tokens + a prompt
    llm_yaml.write_text(yaml.safe_dump(llm))
    refresh(short, "build_in/build/qwen2_vl_llm.yaml")
    report = check_path(short)
    assert status(report, "yaml numbers") == FAIL
    assert "prefill 1024 cannot hold the image's 1280 tokens" in detail(report, "yaml numbers")

    assert status(check_path(vamc, images=[(1280, 720)]), "image 1280x720") == PASS  # 4784 patches of N 5120
    report = check_path(vamc, images=[(1920, 1080)])
    assert status(report, "image 1920x1080") == FAIL
    assert "more than the visual N 5120" in detail(report, "image 1920x1080")
    assert "up to 8192 patches" in fix(report, "image 1920x1080")  # 10764 patches: no vamc N holds it

    assert status(check_path(tpu, images=[(112, 112)]), "image 112x112") == PASS
    report = check_path(tpu, images=[(1280, 720)])
    assert status(report, "image 1280x720") == FAIL
    assert "4784 patches, more than the ViT's 64: the processor shrinks it" in detail(report, "image 1280x720")
    assert "--seq-length 1840 --max-pixels 1288x728" in fix(report, "image 1280x720")

    report = check_path(paddle_inference, images=[(1920, 1080)])
    assert status(report, "image 1920x1080") == FAIL
    assert "more than --max-seq-len 2048" in detail(report, "image 1920x1080")
    assert fix(report, "image 1920x1080").endswith("--max-seq-len 3344")

    options = copy(tpu, tmp_path / "seq")
    edit_manifest_target(options, seq_length=32)  # below 16 vision tokens + 64
    assert status(check_path(options), "compile options") == FAIL
    long = copy(paddle_inference, tmp_path / "long")
    edit_manifest_target(long, max_seq_len=40000)
    assert status(check_path(long), "sequence length") == FAIL


def test_llm_convert_config_fields(tpu: Path, tmp_path: Path) -> None:
    layout = copy(tpu, tmp_path)
    config = json.loads((layout / "model" / "config.json").read_text())
    del config["vision_config"]["spatial_merge_size"]
    (layout / "model" / "config.json").write_text(json.dumps(config))
    refresh(layout, "model/config.json")
    report = check_path(layout)
    assert status(report, "llm_convert config") == FAIL and "spatial_merge_size" in detail(report, "llm_convert config")


def test_toolchain_tpu_mlir(tpu: Path, fake_tools: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    report = check_path(tpu)
    assert status(report, "Python 3.10 + tpu-mlir") == PASS and status(report, "GNU parallel") == PASS
    (fake_tools / "parallel").unlink()
    monkeypatch.setenv("VLHUB_TPU_MLIR_PYTHON", str(tmp_path / "nothing" / "python"))
    report = check_path(tpu)
    assert status(report, "GNU parallel") == FAIL and "apt-get install parallel" in fix(report, "GNU parallel")
    assert status(report, "Python 3.10 + tpu-mlir") == FAIL
    assert "no such interpreter" in detail(report, "Python 3.10 + tpu-mlir")


def test_toolchain_vamc(vamc: Path, fake_tools: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    layout = copy(vamc, tmp_path)
    site = tmp_path / "site"
    fake_distribution(site, "transformers", "4.45.0")
    fake_distribution(site, "huggingface-hub", "0.23.2")
    monkeypatch.syspath_prepend(str(site))
    report = check_path(layout)
    assert status(report, "vamc") == PASS and status(report, "pinned versions") == PASS
    assert status(report, "vendor files") == FAIL and "modeling_qwen2_vl_vacc.py" in detail(report, "vendor files")
    for name in ("modeling_qwen2_vl_vacc.py", "configuration_qwen2_vl.py"):  # what the recipe folder holds
        (layout / "weights" / TINY / name).write_text("# VastModelZOO's\n")
    (fake_tools / "vamc").unlink()
    report = check_path(layout)
    assert status(report, "vendor files") == PASS and status(report, "stray files") == PASS
    assert status(report, "vamc") == FAIL and "not on PATH" in detail(report, "vamc")

    other = tmp_path / "other"
    fake_distribution(other, "transformers", "4.51.3")
    monkeypatch.syspath_prepend(str(other))
    report = check_path(layout)
    assert status(report, "pinned versions") == WARN and "transformers 4.51.3 (recipe: 4.45.0)" in detail(
        report, "pinned versions")


def test_toolchain_paddle(paddle_inference: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert status(check_path(paddle_inference), "paddlepaddle") == PASS
    fake_distribution(tmp_path, "paddlepaddle", "2.6.2")
    monkeypatch.syspath_prepend(str(tmp_path))
    report = check_path(paddle_inference)
    assert status(report, "paddlepaddle") == FAIL and "Paddle 3 runs the layout's pir graphs" in detail(
        report, "paddlepaddle")


def test_resources_disk(tpu: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = check_path(tpu)
    assert status(report, "disk") == PASS
    compile_disk = next(n for n in report.needs if n.step == "compile" and n.resource == "disk")
    with open_checkpoint(tpu / "model") as checkpoint:
        params = sum(meta.numel for meta in checkpoint.tensors.values())
    assert compile_disk.amount == pytest.approx(100e9 * params / 8_291_375_616)  # sophon-demo's 7B, scaled
    assert "sophon-demo" in compile_disk.source and compile_disk.where == str(tpu)
    monkeypatch.setenv("VLHUB_MIN_FREE", "1000TB")
    report = check_path(tpu)
    assert status(report, "disk") == FAIL
    assert "not enough disk space" in detail(report, "disk") and "VLHUB_MIN_FREE keeps" in detail(report, "disk")


def test_smoke_verdict_recorded_and_rerun(paddle: Path, tpu: Path, tmp_path: Path) -> None:
    assert status(check_path(paddle), "smoke test") == PASS
    assert status(check_path(tpu), "smoke test") == WARN  # converted with --no-smoke

    failed = copy(paddle, tmp_path / "failed")
    manifest = json.loads((failed / MANIFEST).read_text())
    manifest["smoke"] = {**manifest["smoke"], "passed": False}
    (failed / MANIFEST).write_text(json.dumps(manifest))
    assert status(check_path(failed), "smoke test") == FAIL

    zeroed = copy(paddle, tmp_path / "zeroed")
    write_at(zeroed, "model.norm.weight", bytes(2 * 128))  # the final norm zeroed: every logit 0
    refresh(zeroed, "model_state.pdparams")
    result = run_vlhub("check", str(zeroed), "--smoke", "--json")
    assert result.returncode == 1, result.stderr
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["smoke test (run now)"]["status"] == FAIL and checks["file hashes"]["status"] == PASS
    assert status(check_path(paddle, smoke=True), "smoke test (run now)") == PASS


def test_cli_json_schema_strict_and_exit_codes(tpu: Path, fake_tools: Path, tmp_path: Path) -> None:
    env = {"PATH": str(fake_tools)}
    result = run_vlhub("check", str(tpu), "--json", env=env)
    assert result.returncode == 0, result.stderr  # one warn: no smoke verdict
    report = json.loads(result.stdout)
    assert set(report) == {"mode", "path", "model", "target", "family", "verdict", "counts", "checks", "needs", "has"}
    assert (report["mode"], report["target"], report["family"], report["verdict"]) == (
        "layout", "tpu-mlir", "qwen2_vl", "warn")
    assert report["counts"] == {"pass": len(report["checks"]) - 1, "warn": 1, "fail": 0}
    assert all(set(c) == {"group", "name", "status", "detail", "fix"} for c in report["checks"])
    assert all(set(n) == {"step", "resource", "amount", "where", "source"} for n in report["needs"])
    assert set(report["has"]) == {"disk_free", "memory_available"}

    strict = run_vlhub("check", str(tpu), "--strict", env=env)
    assert strict.returncode == 1 and "smoke test" in strict.stderr
    assert "pass, 1 warn, 0 fail: WARN" in strict.stdout

    for args, message in [((str(tmp_path / "nowhere"),), "no such file or directory"),
                          ((str(tpu), "--target", "onnx"), "--target 'onnx'"),
                          ((str(tpu), "--target", "vamc"), "is a tpu-mlir layout, not vamc"),
                          ((str(tpu), "--image", "big"), "WIDTHxHEIGHT"),
                          (("qwen2-vl-7b",), "a model that is not converted yet needs one of")]:
        bad = run_vlhub("check", *args, env=env)
        assert bad.returncode == 2 and message in bad.stderr, (args, bad.stderr)
        assert len(bad.stderr.strip().splitlines()) == 1 and bad.stdout == ""


def test_model_before_conversion() -> None:
    result = run_vlhub("check", "qwen2-vl-7b", "--target", "tpu-mlir", "--json")
    report = json.loads(result.stdout)
    assert (report["mode"], report["model"], report["target"]) == ("model", "qwen2-vl-7b", "tpu-mlir")
    needs = {(n["step"], n["resource"]): n for n in report["needs"]}
    assert needs["compile", "disk"]["amount"] == pytest.approx(100e9)  # sophon-demo's 7B figure, this very model
    assert needs["compile", "memory"]["amount"] == pytest.approx(15e9)
    assert needs["convert", "disk"]["amount"] == 16_582_751_232  # the bf16 checkpoint, written once
    # bounded buffers (tiles), not the largest tensor: the measured figure, whatever the model
    assert needs["convert", "memory"]["amount"] == pytest.approx(CONVERT_MEMORY[0])
    assert all(n["source"] for n in report["needs"])
    memory = {c["name"]: c["status"] for c in report["checks"] if c["name"].startswith("memory")}
    assert memory["memory (compile)"] == (FAIL if 15e9 > report["has"]["memory_available"] else PASS)
    assert (result.returncode == 1) == (report["verdict"] == FAIL)

    tiny = check_model(TINY, target="vamc")
    assert [c for c in tiny.checks if c.group in ("route", "source", "numbers", "resources") and c.status != PASS] == []
    assert status(check_model("tiny-qwen-vl", target="tpu-mlir"), "route") == FAIL  # Qwen-VL has no TPU-MLIR route
    planned = check_model("qwen2-vl-7b", target="tpu-mlir", images=[(1280, 720)])
    assert "--seq-length 1840 --max-pixels 1288x728" in fix(planned, "sizes for --image")
