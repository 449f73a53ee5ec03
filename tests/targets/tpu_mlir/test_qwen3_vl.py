"""`vlhub convert --to tpu-mlir` for Qwen3-VL: model/ as TPU-MLIR's llm_convert reads it (Qwen3VLConverter: the
nested config.json in the 4.57 spelling, official names), compile.sh's flags (--max_pixels W,H in multiples of 32,
--dynamic as LLM-TPU's recipe compiles it), the networks the bmodel holds (with `add`), the refusals (the MoE model
type, --onnx, pixels that are not multiples of 32, ViT heads Qwen3VLConverter cannot tile), the plan's arithmetic,
the simulator's inputs; on tiny-qwen3-vl and on a checkpoint transformers itself saves from a Qwen3VLConfig of
dims chosen here. Marked `toolchain` (skipped unless VLHUB_TPU_MLIR_PYTHON names one): compile.sh with the real
llm_convert, then the bmodel's first token on the bm1684x cmodel against the reference's."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import randomize, run_vlhub
from vlhub.catalog import get_model
from vlhub.convert.configs import official_config
from vlhub.errors import UserError
from vlhub.formats.readers import open_checkpoint
from vlhub.plan import make_plan
from vlhub.smoke.inputs import smoke_input
from vlhub.smoke.run import run_smoke
from vlhub.targets import smoke_runner
from vlhub.targets.tpu_mlir.build import TpuOptions, check_tpu_options, tpu_options
from vlhub.targets.tpu_mlir.simulator import TOOLCHAIN_ENV, simulator_inputs

# the smoke image (112x168) is resized up to the processor's 65536-pixel floor: 224x320, 14x20 patches, 70 tokens
SMALL = ["--seq-length", "256", "--max-pixels", "320x224"]
VOCAB = 1024


def convert(source: str | Path, out: Path, *args: str) -> dict:
    result = run_vlhub("convert", str(source), "--to", "tpu-mlir", "--out", str(out), *SMALL, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def saved_by_transformers(module_tmp: Callable[[str], Path]) -> Path:
    """A Qwen3-VL checkpoint as transformers 5 saves it (`save_pretrained`: nested config with `rope_parameters`
    and `dtype`, the vision sub-config typed `qwen3_vl_vision`), bf16, untied, with dims chosen here: text 64 wide,
    4 heads of 32 over 2 KV heads, interleaved sections [6, 5, 5]; vision 64 wide in 4 heads of 16, 2 blocks, one
    DeepStack merger, an 8x8 position table. Weights far from the 0.02-std init, so tokens are decided by margins."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    text = {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 128, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [6, 5, 5],
                                "mrope_interleaved": True}}
    vision = {"depth": 2, "hidden_size": 64, "num_heads": 4, "intermediate_size": 128, "out_hidden_size": 64,
              "num_position_embeddings": 64, "deepstack_visual_indexes": [0], "patch_size": 16,
              "temporal_patch_size": 2, "spatial_merge_size": 2, "hidden_act": "gelu_pytorch_tanh"}
    config = transformers.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                                        image_token_id=VOCAB - 24, video_token_id=VOCAB - 23,
                                        vision_start_token_id=VOCAB - 22, vision_end_token_id=VOCAB - 21)
    torch.manual_seed(0)
    model = transformers.Qwen3VLForConditionalGeneration(config).eval()
    randomize(model, seed=1)
    directory = module_tmp("qwen3-vl-saved")
    model.to(torch.bfloat16).save_pretrained(directory)
    return directory


def check_model_directory(model: Path, dtype: str, mrope_section: list[int]) -> dict:
    """model/ as Qwen3VLConverter reads it; its config.json."""
    config = json.loads((model / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert config["model_type"] == "qwen3_vl" and vision["model_type"] == "qwen3_vl"
    # llm_convert's get_dtype reads text_config.dtype (else torch_dtype) and stops when --quantize differs
    assert text["dtype"] == dtype and config["torch_dtype"] == dtype
    # Qwen3VLConverter reads text_config.rope_scaling.mrope_section (without it: [24, 20, 20], whatever the model)
    assert text["rope_scaling"]["mrope_section"] == mrope_section and "rope_parameters" not in text
    assert isinstance(text["rope_theta"], (int, float))
    for key in ("patch_size", "spatial_merge_size", "temporal_patch_size", "in_channels", "depth", "hidden_size",
                "num_heads", "intermediate_size", "num_position_embeddings", "deepstack_visual_indexes",
                "hidden_act", "out_hidden_size"):
        assert key in vision, key
    with open_checkpoint(model) as checkpoint:
        names = set(checkpoint.tensors)
        assert {meta.dtype for meta in checkpoint.tensors.values()} == {dtype}
    assert all(name.startswith(("model.language_model.", "model.visual.", "lm_head.")) for name in names)
    assert "model.visual.deepstack_merger_list.0.linear_fc2.weight" in names
    return config


def test_tiny_qwen3_vl_layout_model_directory_compile_script_and_networks(tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = convert("tiny-qwen3-vl", out, "--quantize", "bf16")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "compile.sh", "model", "vlhub-manifest.json"]
    assert report["smoke"]["passed"] is True and report["smoke"]["precision"] == "exact"
    check_model_directory(out / "model", "bfloat16", [12, 10, 10])

    spec = get_model("tiny-qwen3-vl")
    layers = spec.config["text_config"]["num_hidden_layers"]
    target = json.loads((out / "vlhub-manifest.json").read_text())["target"]
    assert target["family"] == "qwen3_vl" and target["dtype"] == "bfloat16"
    assert target["vision_patches"] == 280 and target["vision_tokens"] == 70  # 320x224: 20x14 patches of 16
    assert target["networks"][:5] == ["vit", "add", "embedding", "embedding_cache", "lm_head"]
    assert len(target["networks"]) == 5 + 2 * layers and target["dynamic"] is True
    assert target["layers"] == layers and target["hidden_size"] == spec.config["text_config"]["hidden_size"]

    script = (out / "compile.sh").read_text()
    assert "-m ./model -s 256 -q bf16 -c bm1684x --max_pixels 320,224 --dynamic -o ./compiled" in script
    assert target["llm_convert"][1:] == ["-m", "./model", "-s", "256", "-q", "bf16", "-c", "bm1684x",
                                         "--max_pixels", "320,224", "--dynamic", "-o", "./compiled"]
    assert "-g " not in script and " -t " not in script  # llm_convert takes the model type from config.json
    assert subprocess.run(["bash", "-n", str(out / "compile.sh")], check=False).returncode == 0
    readme = (out / "README.md").read_text()
    assert "models/Qwen3_VL/python_demo" in readme and "`add`" in readme
    assert "this model's is 8x8 (num_position_embeddings 64): set `num_grid_per_side = 8`" in readme


def test_default_options_are_llm_convert_s_for_qwen3_vl(tmp_path: Path) -> None:
    """No --max-pixels: llm_convert's own default for a model type without one, 768,768 (a multiple of 32)."""
    out = tmp_path / "out"
    result = run_vlhub("convert", "tiny-qwen3-vl", "--to", "tpu-mlir", "--out", str(out), "--no-smoke", "--json")
    assert result.returncode == 0, result.stderr
    target = json.loads((out / "vlhub-manifest.json").read_text())["target"]
    assert target["max_pixels"] == [768, 768] and target["vision_patches"] == 2304 and target["vision_tokens"] == 576
    assert target["quantize"] == "w4bf16" and target["group_size"] == 64 and target["seq_length"] == 2048
    assert "-q w4bf16 -g 64 -c bm1684x --max_pixels 768,768 --dynamic" in (out / "compile.sh").read_text()


@pytest.mark.parametrize(("quantize", "dtype", "flags"), [
    ("w4bf16", "bfloat16", "-q w4bf16 -g 64 -c bm1684x --max_pixels 320,224 --dynamic -o ./compiled"),
    ("w8f16", "float16", "-q w8f16 -g 32 -c bm1684x --max_pixels 320,224 --dynamic -o ./compiled"),
])
def test_a_checkpoint_transformers_saved_converts_and_its_smoke_passes(saved_by_transformers: Path, tmp_path: Path,
                                                                       quantize: str, dtype: str, flags: str) -> None:
    out = tmp_path / "out"
    extra = ["--group-size", "32"] if quantize == "w8f16" else []
    report = convert(saved_by_transformers, out, "--quantize", quantize, *extra)
    assert report["smoke"]["passed"] is True and report["target"]["dtype"] == dtype
    config = check_model_directory(out / "model", dtype, [6, 5, 5])
    assert config["text_config"]["rope_theta"] == 5000000.0
    with open_checkpoint(out / "model") as written, open_checkpoint(saved_by_transformers) as saved:
        assert written.tensors.keys() == saved.tensors.keys()  # the official names transformers 5 saves
        assert "lm_head.weight" in written.tensors  # untied
    assert flags in (out / "compile.sh").read_text()
    target = json.loads((out / "vlhub-manifest.json").read_text())["target"]
    assert target["networks"][:2] == ["vit", "add"] and target["vision_patches"] == 280


def test_the_mixture_of_experts_model_type_is_refused_in_one_line(tmp_path: Path) -> None:
    result = run_vlhub("convert", "tiny-qwen3-vl-moe", "--to", "tpu-mlir", "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "has no qwen3_vl_moe converter" in result.stderr and "LLM-TPU" in result.stderr
    assert not (tmp_path / "out").exists()
    plan = run_vlhub("plan", "tiny-qwen3-vl-moe", "--image", "640x480", "--target", "tpu-mlir")
    assert plan.returncode == 2 and "has no qwen3_vl_moe converter" in plan.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--max-pixels", "300x224"], ("--max-pixels 300x224: W and H must be multiples of 32 (16-pixel patches merged "
                                  "2x2), at least 64; e.g. 288x224")),
    (["--max-pixels", "336x336"], "multiples of 32"),  # a Qwen2-VL budget (multiples of 28)
    (["--max-pixels", "640x640", "--seq-length", "256"], ("a 640x640 image is 400 vision tokens, so the sequence "
                                                         "needs at least 464")),
    (["--onnx"], "--onnx exports the older flow's networks"),
])
def test_bad_options_are_refused_before_anything_is_written(args: list[str], message: str, tmp_path: Path) -> None:
    result = run_vlhub("convert", "tiny-qwen3-vl", "--to", "tpu-mlir", "--out", str(tmp_path / "out"), *SMALL, *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and not list(tmp_path.iterdir())


def test_vision_heads_qwen3vlconverter_cannot_tile_are_refused_naming_the_fields() -> None:
    config = official_config(json.loads(json.dumps(get_model("tiny-qwen3-vl").config)))
    options = tpu_options(get_model("tiny-qwen3-vl").family, config, "bfloat16", max_pixels="320x224",
                          seq_length=256)
    assert (options.patch, options.merge, options.factor) == (16, 2, 32)
    config["vision_config"].update(hidden_size=36, num_heads=2)  # head_dim 18: its rotary table is 18 / 4 wide
    with pytest.raises(UserError, match=r"vision heads are 18 wide; TPU-MLIR's llm_convert compiles only multiples "
                                        r"of 4 \(.*; vision_config hidden_size 36 / num_heads 2\)"):
        check_tpu_options(config, options)


def test_the_plan_uses_qwen3_vl_arithmetic() -> None:
    """1280x720 with factor 32: 720 / 32 = 22.5 -> 22 -> 704, 1280 / 32 = 40; 44 x 80 patches of 16 = 3520, 880
    tokens; llm_convert's budget is that resized image, W,H = 1280,704."""
    plan = make_plan("qwen3-vl-4b", images=[(1280, 720)], target="tpu-mlir")
    tpu = plan.targets["tpu-mlir"].to_json()
    assert tpu["max_pixels"] == [1280, 704] and tpu["vision_patches"] == 3520 and tpu["vision_tokens"] == 880
    assert tpu["seq_length"] == plan.sizing.sizes.max_length
    options = tpu_options(plan.sizing.family, plan.sizing.config, "bfloat16", max_pixels="1280x704",
                          seq_length=tpu["seq_length"])
    assert options.vision_patches == 3520


def test_simulator_inputs_for_the_dynamic_networks() -> None:
    """llm_convert --dynamic: the ViT takes the image's own rows (no mask input) with the position table's four taps,
    the prefill blocks the prompt's own positions (their mask is built in); the token ids stay padded."""
    config = get_model("tiny-qwen3-vl").config
    smoke = smoke_input(config)
    vision = smoke.vision
    assert vision is not None and vision.interp_indices is not None
    count, length = len(vision.pixel_values), len(smoke.input_ids)
    inputs = simulator_inputs(smoke, config, 256, 280, dynamic=True)
    assert inputs["vit.input_states"].shape == (count, 1536) and inputs["vit.input_states"].dtype == np.float32
    assert inputs["vit.position_ids"].shape == (count, 2) and inputs["vit.position_ids"].dtype == np.int32
    assert inputs["vit.pos_idx"].shape == (count, 4) and inputs["vit.pos_idx"].dtype == np.int32
    assert inputs["vit.pos_weight"].shape == (count, 4, 1) and inputs["vit.pos_weight"].dtype == np.float32
    assert np.allclose(inputs["vit.pos_weight"].sum(axis=1), 1)
    assert inputs["input_ids"].shape == (1, 256) and inputs["position_ids"].shape == (3, length)
    assert not any("mask" in name for name in inputs) and inputs["last"] == length - 1
    assert list(inputs["image_rows"]) == list(np.flatnonzero(smoke.image_mask))
    static = simulator_inputs(smoke, config, 256, 320)  # without --dynamic: padded, with the ViT's mask
    assert static["vit.pos_idx"].shape == (320, 4) and static["vit.attention_mask"].shape == (1, 1, 320, 320)
    assert static["position_ids"].shape == (3, 256)


def test_options_built_by_hand_keep_qwen2_vl_arithmetic() -> None:
    assert TpuOptions(128, (112, 112), "bf16", 64, "bm1684x").vision_patches == 64  # 14-pixel patches
    assert TpuOptions(128, (320, 224), "bf16", 64, "bm1684x", 16, 2).vision_patches == 280


@pytest.mark.toolchain
@pytest.mark.skipif(not os.environ.get(TOOLCHAIN_ENV), reason=f"{TOOLCHAIN_ENV} names no TPU-MLIR toolchain")
def test_compile_sh_and_the_cmodel_first_token(saved_by_transformers: Path, tmp_path: Path) -> None:
    """llm_convert compiles the layout (vit with its DeepStack outputs, add, blocks) and the bmodel's first token on
    the cmodel is the reference's (a 1024-word vocabulary: seconds, not minutes, for lm_head)."""
    out = tmp_path / "out"
    convert(saved_by_transformers, out, "--quantize", "bf16", "--no-smoke")
    report = run_smoke(smoke_runner(out, {"tpu_mlir_python": os.environ[TOOLCHAIN_ENV]}), tokens=1)
    stage = report.stages[-1]
    assert stage.name == "simulator" and stage.passed, stage.detail
    assert stage.detail.startswith(f"bm1684x cmodel token {report.tokens_ref[0]}, reference {report.tokens_ref[0]},")
    assert "vision embeddings cosine" in stage.detail  # the main merger's and the DeepStack feature, stacked
    assert stage.cosine is not None and stage.cosine > 0.999
    assert report.passed and list((out / "compiled").glob("*_dynamic_*.bmodel"))
