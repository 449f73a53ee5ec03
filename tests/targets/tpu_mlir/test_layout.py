"""`vlhub convert --to tpu-mlir`: the model directory llm_convert reads, compile.sh, the manifest, the checked
options, and the smoke test of model/."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import run_vlhub
from vlhub.catalog import get_model
from vlhub.errors import UserError
from vlhub.formats.readers import open_checkpoint
from vlhub.inspect import inspect_checkpoint
from vlhub.targets.tpu_mlir.build import TpuOptions, check_tpu_options, tpu_options

SMALL = ["--seq-length", "128", "--max-pixels", "112x112"]


def convert(source: str | Path, out: Path, *args: str) -> dict:
    result = run_vlhub("convert", str(source), "--to", "tpu-mlir", "--out", str(out), *SMALL, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("model", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_layout_holds_the_model_directory_compile_script_and_manifest(model: str, tmp_path: Path) -> None:
    report = convert(model, tmp_path / "out", "--quantize", "bf16")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "compile.sh", "model", "vlhub-manifest.json"]
    assert report["smoke"]["passed"] is True and report["smoke"]["precision"] == "exact"

    spec = get_model(model)
    info = inspect_checkpoint(out / "model")
    assert info.layout == "official" and set(info.dtypes) == {"bfloat16"}
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["model_type"] == spec.family.name
    vision = config["vision_config"]
    assert vision["in_channels"] == 3 and vision["patch_size"] == 14 and vision["temporal_patch_size"] == 2
    assert vision["hidden_act"] == ("quick_gelu" if spec.family.name == "qwen2_vl" else "silu")

    target = json.loads((out / "vlhub-manifest.json").read_text())["target"]
    assert target["vision_patches"] == 64 and target["vision_tokens"] == 16  # 112x112: 8x8 patches, merged 2x2
    assert target["layers"] == spec.config["num_hidden_layers"] and target["kv_heads"] == 2
    assert target["networks"][:4] == ["vit", "embedding", "embedding_cache", "lm_head"]
    assert len(target["networks"]) == 4 + 2 * spec.config["num_hidden_layers"]
    script = (out / "compile.sh").read_text()
    assert "-m ./model -s 128 -q bf16 -c bm1684x --max_pixels 112,112 -o ./compiled" in script
    assert "-g " not in script  # a group size only for w4/w8
    assert subprocess.run(["bash", "-n", str(out / "compile.sh")], check=False).returncode == 0


def test_compile_script_stops_with_a_clear_message_without_the_toolchain(tmp_path: Path) -> None:
    convert("tiny-qwen2-vl", tmp_path / "out", "--no-smoke")
    result = subprocess.run(["bash", str(tmp_path / "out" / "compile.sh")], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "VLHUB_TPU_MLIR_PYTHON": "/nonexistent/python3.10"},
                            check=False)
    assert result.returncode == 2 and "install Python 3.10" in result.stderr
    assert not (tmp_path / "out" / "compiled").exists()


# a python3.10 stand-in that has tpu_mlir (argument 1: 0) or not (1), and torch and psutil (0) or not (1)
FAKE_PYTHON = """#!/usr/bin/env bash
case "$2" in
    *version_info*) exit 0 ;;
    *"import tpu_mlir"*) exit {} ;;
    *"import torch, psutil"*) exit {} ;;
esac
exit 0
"""


@pytest.mark.parametrize(("tpu_mlir", "torch"), [(1, 1), (0, 1)])
def test_compile_script_install_hints_pin_the_cpu_torch(tpu_mlir: int, torch: int, tmp_path: Path) -> None:
    """An unpinned `pip install torch` on Python 3.10 pulls the CUDA build and its libraries: the hints give
    torch==2.13.0 first, as docs/targets/tpu-mlir.md sets the toolchain up (and say where)."""
    convert("tiny-qwen2-vl", tmp_path / "out", "--no-smoke")
    python = tmp_path / "python3.10"
    python.write_text(FAKE_PYTHON.format(tpu_mlir, torch))
    python.chmod(0o755)
    result = subprocess.run(["bash", str(tmp_path / "out" / "compile.sh")], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "VLHUB_TPU_MLIR_PYTHON": str(python)}, check=False)
    assert result.returncode == 2, result.stderr
    hint = result.stderr.strip()
    assert ("tpu-mlir is not importable" if tpu_mlir else "TPU-MLIR also needs torch") in hint
    assert "torch==2.13.0" in hint and "docs/targets/tpu-mlir.md in vlhub's source" in hint
    assert hint.index("torch==2.13.0") < hint.index("-m pip install")
    assert not re.search(r"pip install[^;:(]*\btorch\b(?!==)", hint)  # never an unpinned torch to install


def test_quantize_decides_the_weights_dtype(tmp_path: Path) -> None:
    report = convert("tiny-qwen2-vl", tmp_path / "out", "--quantize", "w4f16", "--group-size", "128")
    assert report["target"]["dtype"] == "float16" and report["smoke"]["precision"] == "float16"
    assert report["smoke"]["passed"] is True
    with open_checkpoint(tmp_path / "out" / "model") as checkpoint:
        assert {meta.dtype for meta in checkpoint.tensors.values()} == {"float16"}
    assert json.loads((tmp_path / "out" / "model" / "config.json").read_text())["torch_dtype"] == "float16"
    assert "-q w4f16 -g 128 -c bm1684x" in (tmp_path / "out" / "compile.sh").read_text()


def test_a_transformers5_source_gets_official_key_names(tiny_qwen2_vl_transformers5: Path,
                                                        tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    convert(tiny_qwen2_vl_transformers5, tmp_path / "out", "--quantize", "bf16", "--no-smoke")
    with open_checkpoint(tmp_path / "out" / "model") as written, open_checkpoint(tiny_qwen2_vl) as official:
        assert written.tensors.keys() == official.tensors.keys()
    config = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert "text_config" not in config and config["hidden_size"] == 128


@pytest.mark.parametrize(("args", "message"), [
    (["--max-pixels", "100x100"], "multiples of 28"),
    (["--max-pixels", "448x448", "--seq-length", "256"], "needs at least 320"),  # 256 vision tokens + 64
    (["--seq-length", "100000"], "at most 32768"),
    (["--quantize", "int4"], "choose one of w4bf16"),
    (["--chip", "bm1690"], "choose bm1684x or bm1688"),
    (["--quantize", "w4bf16", "--group-size", "48"], "must divide every quantized Linear's input"),
    (["--max-pixels", "wide"], "write WIDTHxHEIGHT in pixels, width first"),
    (["--onnx"], "fewer than the smoke test's 168x112 image (96); give at least 168x112"),
])
def test_bad_options_are_refused_before_anything_is_written(args: list[str], message: str, tmp_path: Path) -> None:
    result = run_vlhub("convert", "tiny-qwen2-vl", "--to", "tpu-mlir", "--out", str(tmp_path / "out"), *SMALL, *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_qwen_vl_has_no_route_and_options_belong_to_their_target(tmp_path: Path) -> None:
    qwen_vl = run_vlhub("convert", "tiny-qwen-vl", "--to", "tpu-mlir", "--out", str(tmp_path / "out"))
    assert qwen_vl.returncode == 2 and "no TPU-MLIR route" in qwen_vl.stderr
    other = run_vlhub("convert", "tiny-qwen2-vl", "--to", "paddle", "--chip", "bm1688")
    assert other.returncode == 2 and "--chip does not apply to --to paddle (it applies to --to tpu-mlir)" in other.stderr
    dtype = run_vlhub("convert", "tiny-qwen2-vl", "--to", "tpu-mlir", "--dtype", "float16")
    assert dtype.returncode == 2 and "drop --dtype" in dtype.stderr
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep").write_text("x")
    busy = run_vlhub("convert", "tiny-qwen2-vl", "--to", "tpu-mlir", "--out", str(tmp_path / "busy"), *SMALL)
    assert busy.returncode == 2 and "--overwrite" in busy.stderr
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep"]


@pytest.mark.parametrize(("model", "pixels", "patches"), [
    ("qwen2.5-vl-7b", (672, 896), 3072),  # llm_convert's default: 768 vision tokens
    ("qwen2-vl-7b", (756, 756), 2916),
    ("qwen2-vl-2b", (1288, 728), 4784),   # a 720p frame as the processor resizes it
])
def test_vision_sizes_follow_smart_resize(model: str, pixels: tuple[int, int], patches: int) -> None:
    spec = get_model(model)
    options = tpu_options(spec.family, spec.config, "bfloat16", max_pixels="{}x{}".format(*pixels),
                          seq_length=8192)
    assert options.vision_patches == patches and options.vision_tokens == patches // 4
    with pytest.raises(UserError, match=f"at least {patches // 4 + 64}"):
        check_tpu_options(spec.config, TpuOptions(patches // 4 + 63, pixels, "w4bf16", 64, "bm1684x"))


def test_vlhub_smoke_of_the_layout_runs_its_model_directory(tmp_path: Path) -> None:
    convert("tiny-qwen2.5-vl", tmp_path / "out", "--no-smoke")
    result = run_vlhub("smoke", str(tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] is True and report["artifact"] == str(tmp_path / "out" / "model")


@pytest.mark.parametrize("model", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_onnx_networks_are_exported_compiled_by_script_and_smoke_tested_in_onnxruntime(model: str,
                                                                                       tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    report = convert(model, tmp_path / "out", "--onnx", "--quantize", "w4bf16", "--max-pixels", "168x112")
    out = tmp_path / "out"
    assert report["smoke"]["runtime"] == "onnxruntime" and report["smoke"]["passed"] is True
    assert report["smoke"]["artifact"] == str(out)
    layers = get_model(model).config["num_hidden_layers"]
    networks = report["target"]["onnx"]["networks"]
    assert len(networks) == 6 + 2 * layers and "vit" in networks
    assert networks["block_cache_0"]["inputs"][3][1] == [1, 128, 2, 32]  # history_k: [1, S, KV, D]
    for network in networks.values():
        assert (out / network["file"]).is_file() and network["file"] in report["files"]
    script = (out / "compile_onnx.sh").read_text()
    assert script.count("\nnet ") == len(networks) and "--addr_mode io_alone" in script
    assert f"compiled_onnx/{model}_w4bf16_seq128_bm1684x_1dev.bmodel" in script
    assert "--q_group_size 64" in script and subprocess.run(["bash", "-n", str(out / "compile_onnx.sh")],
                                                            check=False).returncode == 0


def test_a_vit_llm_convert_cannot_compile_is_refused() -> None:
    config = json.loads(json.dumps(get_model("tiny-qwen2-vl").config))
    config["vision_config"].update(embed_dim=64, num_heads=4)  # head_dim 16: llm_convert's rotary table is fixed
    with pytest.raises(UserError, match="vision heads are 16 wide; TPU-MLIR's llm_convert compiles only 80"):
        check_tpu_options(config, TpuOptions(128, (112, 112), "bf16", 64, "bm1684x"))
