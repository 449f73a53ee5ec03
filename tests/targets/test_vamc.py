"""`vlhub convert --to vamc`: the VastAI layout (weights folder, yamls, embed_tokens.bin, preprocess config,
compile.sh), its computed and checked numbers, and its hardware-free smoke test."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from tests.helpers import run_vlhub
from vlhub.catalog import get_model
from vlhub.convert.configs import official_config
from vlhub.errors import UserError
from vlhub.smoke.inputs import smoke_input
from vlhub.smoke.weights import ModelWeights
from vlhub.targets.vamc.build import llm_yaml, needs_stack_size, vamc_options, visual_yaml
from vlhub.targets.vamc.plan import visual_output_split


def convert(source: str | Path, out: Path, *args: str) -> dict:
    result = run_vlhub("convert", str(source), "--to", "vamc", "--out", str(out), *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def load_yamls(out: Path, family: str) -> tuple[dict, dict]:
    build = out / "build_in" / "build"
    return (yaml.safe_load((build / f"{family}_llm.yaml").read_text()),
            yaml.safe_load((build / f"{family}_visual.yaml").read_text()))


@pytest.mark.parametrize("model", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_layout_numbers_embeddings_and_smoke(model: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = convert(model, out)
    spec = get_model(model)
    family, config = spec.family.name, spec.config
    name = model
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "README.md", "build_in", "compile.sh", "embed_tokens.bin", "embed_tokens.json", "preprocess_config.json",
        "vlhub-manifest.json", "weights"])
    assert report["smoke"]["passed"] is True and report["smoke"]["runtime"] == "onnxruntime"
    assert [s["name"] for s in report["smoke"]["stages"]] == [
        "embed_tokens.bin rows", "vision embeddings (vacc ONNX)", "yaml numbers"]

    weights = out / "weights" / name
    vacc = json.loads((weights / "config_vacc.json").read_text())
    assert vacc["_attn_implementation"] == "eager" and vacc["insert_slice"] is True
    assert vacc["auto_map"]["AutoModel"].startswith(f"modeling_{family}_vacc.")
    assert {k: v for k, v in vacc.items() if k not in ("auto_map", "_attn_implementation", "insert_slice")} \
        == json.loads((weights / "config.json").read_text())

    # the default budget: VastModelZOO's 1,003,520 pixels -> 5120 patches, 1280 tokens
    llm, visual = load_yamls(out, family)
    assert visual["name"] == f"{model.replace('-', '_')}_visual_2layer_5120_fp16"
    assert visual["frontend"]["shape"] == {"pixel_values": [5120, 1176], "attention_mask": [1, 5120, 5120],
                                           "cos": [5120, 80], "sin": [5120, 80]}
    assert visual["frontend"]["checkpoint"] == str(weights.absolute())
    assert visual["backend"]["compile"]["output_layout"] == ["0:YX"]  # hidden 128: one chunk
    assert llm["frontend"]["shape"]["input_ids"] == [[1408], [1920]]  # 1280 + 128 prompt; + 512 answer
    assert llm["frontend"]["model_kwargs"]["tp"] == 2  # the tiny model has 2 KV heads
    assert llm["name"] == f"{model.replace('-', '_')}_llm_2layer_1408_1920_tp2_fp16"
    assert llm["workspace"]["pyenv"]["transformers"] == ("4.51.3" if family == "qwen2_5_vl" else "4.45.0")
    if family == "qwen2_5_vl":
        assert visual["backend"]["compile"]["fullatt_block_indexes"] == [1]
    assert json.loads((out / "preprocess_config.json").read_text()) == {"min_pixels": 3136, "max_pixels": 1003520}

    table = np.fromfile(out / "embed_tokens.bin", dtype="<f2")
    assert table.size == config["vocab_size"] * config["hidden_size"]
    with ModelWeights.open(weights) as stored:  # bf16, read as float32 (exact)
        source = stored.get("model.embed_tokens.weight")
    assert np.array_equal(table.reshape(source.shape), source.astype(np.float16))

    script = (out / "compile.sh").read_text()
    assert f"vamc compile build_in/build/{family}_visual.yaml" in script
    assert ("export VACC_STACK_SIZE=256\n" in script) == (family == "qwen2_5_vl")
    assert subprocess.run(["bash", "-n", str(out / "compile.sh")], check=False).returncode == 0
    stopped = subprocess.run(["bash", str(out / "compile.sh")], capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin"}, check=False)
    assert stopped.returncode == 2 and "vamc is not on PATH" in stopped.stderr
    readme = (out / "README.md").read_text()
    assert f"--vit_model vamc_results/{visual['name']}" in readme and "--max_pixels 1003520" in readme


# VastModelZOO's recipe folders, vlm/<family>/build_in/source_code/ on main, file for file
VENDOR_FOLDERS = {
    "qwen2_vl": ("config_vacc.json", "configuration_qwen2_vl.py", "export_onnx.py", "modeling_qwen2_vl_vacc.py"),
    "qwen2_5_vl": ("config.json", "configuration_qwen2_5_vl_vacc.py", "modeling_qwen2_5_vl_vacc.py",
                   "processing_qwen2_5_vl_vacc.py"),
}
# a stand-in vamc: logs the VACC_STACK_SIZE each compile sees and makes the output folder its yaml names
FAKE_VAMC = """#!/usr/bin/env bash
echo "${VACC_STACK_SIZE:-unset} $*" >> vamc.log
mkdir -p "vamc_results/$(sed -n 's/^name: //p' "$2")"
"""


@pytest.mark.parametrize("model", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_compile_script_runs_with_the_vendor_recipe_folder(model: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(model, out, "--no-smoke")
    family = get_model(model).family.name
    for name in VENDOR_FOLDERS[family]:
        if name.endswith(".py"):  # the vendor's Python files; its configs are what vlhub writes itself
            (out / "weights" / model / name).write_text("# VastAI's file\n")
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "vamc").write_text(FAKE_VAMC)
    (tools / "vamc").chmod(0o755)
    result = subprocess.run(["bash", str(out / "compile.sh")], capture_output=True, text=True,
                            env={"PATH": f"{tools}:/usr/bin:/bin"}, check=False)
    assert result.returncode == 0, result.stderr
    log = [line.split() for line in (out / "vamc.log").read_text().splitlines()]
    # Qwen2.5-VL's recipe exports VACC_STACK_SIZE=256 before both compiles
    stack = "256" if family == "qwen2_5_vl" else "unset"
    assert log == [[stack, "compile", f"build_in/build/{family}_visual.yaml"],
                   [stack, "compile", f"build_in/build/{family}_llm.yaml"]]
    llm, _ = load_yamls(out, family)
    assert (out / "vamc_results" / llm["name"] / "embed_tokens.bin").is_file()


def test_image_sizes_plan_the_visual_n(tmp_path: Path) -> None:
    convert("tiny-qwen2-vl", tmp_path / "out", "--image", "1280x720", "--image", "640x480")
    llm, visual = load_yamls(tmp_path / "out", "qwen2_vl")
    # 720p -> 728x1288, 52x92 = 4784 patches (a multiple of 16), 1196 tokens
    assert visual["frontend"]["shape"]["pixel_values"] == [4784, 1176]
    assert llm["frontend"]["shape"]["input_ids"] == [[1328], [1840]]
    preprocess = json.loads((tmp_path / "out" / "preprocess_config.json").read_text())
    assert preprocess["max_pixels"] == 4784 * 196
    target = json.loads((tmp_path / "out" / "vlhub-manifest.json").read_text())["target"]
    assert target["pixels"]["images"] == [[1280, 720], [640, 480]]


@pytest.mark.parametrize(("model", "tp", "split", "stack"), [
    ("qwen2-vl-2b", 2, [640, 640, 256], False),
    ("qwen2-vl-7b", 4, [640] * 5 + [384], False),
    ("qwen2-vl-72b", 4, [640] * 12 + [512], True),
    ("qwen2.5-vl-3b", 2, [640] * 3 + [128], True),
    ("qwen2.5-vl-7b", 4, [640] * 5 + [384], True),
    ("qwen2.5-vl-32b", 4, [640] * 8, True),
    ("qwen2.5-vl-72b", 4, [640] * 12 + [512], True),
])
def test_catalog_numbers(model: str, tp: int, split: list[int], stack: bool) -> None:
    spec = get_model(model)
    config = official_config(spec.config)
    options = vamc_options(spec.family, config)
    assert (options.visual_patches, options.max_pixels, options.prefill_length, options.tp) == (
        5120, 5120 * 196, 1408, tp)
    assert visual_output_split(config["hidden_size"]) == split and sum(split) == config["hidden_size"]
    visual = visual_yaml(spec.family, "v", "/ckpt", config, options)
    assert len(visual["backend"]["compile"]["output_layout"]) == len(split)
    assert visual["frontend"]["shape"]["cos"] == [5120, 80]
    assert llm_yaml(spec.family, "l", "/ckpt", options)["frontend"]["model_kwargs"]["tp"] == tp
    assert needs_stack_size(spec.family, config) is stack
    # the seed's numbers: 720p at the README's budget needs 4784 patches; N = 4096 allows 802,816 pixels
    assert vamc_options(spec.family, config, image=("1280x720",)).visual_patches == 4784
    assert vamc_options(spec.family, config, max_pixels="802816").visual_patches == 4096
    # a prefill above N's 1280 tokens holds them and a prompt (`vlhub plan --prompt-tokens 16` prints 1296)
    assert vamc_options(spec.family, config, prefill_len=1296).prefill_length == 1296


@pytest.mark.parametrize(("args", "message"), [
    (["--tp", "4"], ("--tp 4: tensor parallelism splits the model's 2 KV heads across dies, so it must divide 2: "
                    "choose 1, 2")),
    (["--prefill-len", "1024"], "--prefill-len 1024: the prefill 1024 cannot hold the image's 1280 tokens"),
    (["--prefill-len", "1500"], "the prefill 1500 is not a multiple of 16"),
    (["--max-len", "1408"], "--max-len 1408: the context must be longer than the prefill"),
    (["--max-pixels", "2000000"], "needs a visual N of 10208; vlhub builds N up to 8192"),
    (["--max-pixels", "1280x720"], "the largest image's pixel count, e.g. --max-pixels 921600 (1280x720)"),
    (["--image", "1280x720", "--max-pixels", "921600"], "not both"),
    (["--image", "720p"], "--image '720p': write WIDTHxHEIGHT"),
    (["--dtype", "bfloat16"], "compile float16"),
    (["--chip", "bm1688"], "--chip does not apply to --to vamc"),
    (["--max-pixels", "3136"], "below the smoke test's 168x112 image"),
])
def test_bad_options_are_refused_before_anything_is_written(args: list[str], message: str, tmp_path: Path) -> None:
    result = run_vlhub("convert", "tiny-qwen2-vl", "--to", "vamc", "--out", str(tmp_path / "out"), *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_qwen_vl_has_no_route_and_a_busy_directory_is_kept(tmp_path: Path) -> None:
    qwen_vl = run_vlhub("convert", "tiny-qwen-vl", "--to", "vamc", "--out", str(tmp_path / "out"))
    assert qwen_vl.returncode == 2 and "no vamc route" in qwen_vl.stderr
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep").write_text("x")
    busy = run_vlhub("convert", "tiny-qwen2-vl", "--to", "vamc", "--out", str(tmp_path / "busy"))
    assert busy.returncode == 2 and "--overwrite" in busy.stderr
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep"]
    with pytest.raises(UserError, match="no vamc route"):
        vamc_options(get_model("tiny-qwen-vl").family, {})


def test_smoke_fails_for_the_right_reason(tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert("tiny-qwen2-vl", out, "--no-smoke")

    def smoke() -> dict:
        result = run_vlhub("smoke", str(out), "--against", "tiny-qwen2-vl", "--json")
        assert result.returncode in (0, 1), result.stderr
        return {s["name"]: s for s in json.loads(result.stdout)["stages"]}

    assert all(stage["passed"] for stage in smoke().values())
    table = np.memmap(out / "embed_tokens.bin", dtype="<f2", mode="r+")
    first = int(smoke_input(official_config(get_model("tiny-qwen2-vl").config)).input_ids[0])
    table[first * 128] += 1  # the prompt's first token
    table.flush()
    stages = smoke()
    assert not stages["embed_tokens.bin rows"]["passed"] and stages["vision embeddings (vacc ONNX)"]["passed"]

    build = out / "build_in" / "build" / "qwen2_vl_llm.yaml"
    llm = yaml.safe_load(build.read_text())
    llm["frontend"]["model_kwargs"]["tp"] = 4
    build.write_text(yaml.safe_dump(llm))
    numbers = smoke()["yaml numbers"]
    assert not numbers["passed"] and "tp 4 does not divide the 2 KV heads" in numbers["detail"]


def test_smoke_catches_a_damaged_vision_weight(tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert("tiny-qwen2.5-vl", out, "--no-smoke")
    shard = out / "weights" / "tiny-qwen2.5-vl" / "model.safetensors"
    with safe_open(str(shard), "pt") as f:  # torch: numpy has no bfloat16
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        metadata = f.metadata()
    tensors["visual.blocks.0.mlp.down_proj.weight"] = tensors["visual.blocks.0.mlp.down_proj.weight"] * 3
    save_file(tensors, str(shard), metadata=metadata)
    result = run_vlhub("smoke", str(out), "--against", "tiny-qwen2.5-vl", "--json")
    stages = {s["name"]: s for s in json.loads(result.stdout)["stages"]}
    assert result.returncode == 1 and not stages["vision embeddings (vacc ONNX)"]["passed"]
