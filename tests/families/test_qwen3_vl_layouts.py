"""Qwen3-VL's checkpoints in every form a user may hold, judged by transformers: a mixture-of-experts model as
transformers 5 re-saves it (experts [E, 2 x moe_inter, hidden]), as the Hub's files hold it ([E, hidden,
2 x moe_inter] and [E, moe_inter, hidden]) and one expert at a time; what `--to paddle` writes for PaddleFormers;
the releases and configs vlhub refuses, each in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conformance.factory import per_expert
from tests.helpers import run_vlhub

# hidden 96, experts of 40 (2 x 40 = 80): no expert matrix is square, so transformers' own loader can tell the
# Hub's form from its re-save form (it transposes on load only where the shapes differ)
TEXT = dict(vocab_size=1000, hidden_size=96, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40,
            rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [6, 5, 5],
                             "mrope_interleaved": True})
VISION = dict(depth=2, hidden_size=64, intermediate_size=96, num_heads=2, out_hidden_size=96,
              num_position_embeddings=16, deepstack_visual_indexes=[1])
IDS = dict(image_token_id=999, video_token_id=998, vision_start_token_id=997, vision_end_token_id=996)


@pytest.fixture(scope="module")
def resaved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A tiny Qwen3-VL MoE that transformers saved (its re-save form), and its state dict."""
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen3VLMoeConfig(text_config=TEXT, vision_config=VISION, **IDS)
    model = transformers.Qwen3VLMoeForConditionalGeneration(config).eval()
    directory = tmp_path_factory.mktemp("resaved")
    model.save_pretrained(directory)
    return directory, {name: tensor.clone() for name, tensor in model.state_dict().items()}


def _rewrite_experts(source: Path, out: Path, rewrite) -> Path:
    shutil.copytree(source, out)
    for shard in out.glob("*.safetensors"):
        tensors = load_file(shard)
        save_file(rewrite(tensors), shard, metadata={"format": "pt"})
    (out / "model.safetensors.index.json").unlink(missing_ok=True)  # one shard at this size
    return out


def _hub_form(tensors: dict) -> dict:
    return {name: tensor.transpose(1, 2).contiguous() if ".experts." in name else tensor
            for name, tensor in tensors.items()}


def _inspect(path: Path) -> dict:
    result = run_vlhub("inspect", str(path), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _loaded(directory: Path) -> dict:
    import transformers

    model = transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(directory, dtype=torch.float32)
    return model.state_dict()


@pytest.mark.parametrize("form", ["re-save", "hub", "per-expert"])
def test_every_expert_form_converts_to_the_hub_form(resaved: tuple[Path, dict], tmp_path: Path, form: str) -> None:
    """Each form is recognised, converts (its default smoke test passing) to the Hub's form expert by expert, and
    transformers loads the result with every tensor equal to the model's."""
    directory, state = resaved
    source = {"re-save": lambda: directory,
              "hub": lambda: _rewrite_experts(directory, tmp_path / "hub", _hub_form),
              "per-expert": lambda: _rewrite_experts(directory, tmp_path / "per-expert", per_expert)}[form]()
    layout = {"re-save": "transformers-5", "hub": "official", "per-expert": "per-expert"}[form]
    assert _inspect(source)["layout"] == layout
    out = tmp_path / "out"
    result = run_vlhub("convert", str(source), "--to", "safetensors", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert _inspect(out)["layout"] == "official"
    written = load_file(out / "model.safetensors")
    gate_up = "model.language_model.layers.1.mlp.experts.gate_up_proj"
    assert written[gate_up].shape == (4, 96, 80)  # [E, hidden, gate | up]
    assert torch.equal(written[gate_up], state[gate_up].transpose(1, 2))
    loaded = _loaded(out)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state.items())


def test_a_missing_expert_is_named_before_anything_is_written(resaved: tuple[Path, dict], tmp_path: Path) -> None:
    directory, _ = resaved

    def drop_one(tensors: dict) -> dict:
        split = per_expert(tensors)
        split.pop("model.language_model.layers.0.mlp.experts.3.up_proj.weight", None)
        return split

    source = _rewrite_experts(directory, tmp_path / "gap", drop_one)
    result = run_vlhub("convert", str(source), "--to", "safetensors", "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "layers.0.mlp.experts.gate_up_proj (expert 3, part 2 of 2)" in result.stderr
    assert not (tmp_path / "out").exists()


def test_paddle_output_is_what_paddleformers_loads(resaved: tuple[Path, dict], tmp_path: Path) -> None:
    """`--to paddle` writes the Hugging Face form PaddleFormers reads (docs/facts/paddleformers-qwen3-vl.md):
    official names and shapes in safetensors, a nested config.json in the release's spelling, with a top-level
    torch_dtype and no dtype (how FastDeploy tells it from Paddle weights)."""
    directory, state = resaved
    out = tmp_path / "paddle"
    result = run_vlhub("convert", str(directory), "--to", "paddle", "--out", str(out), "--no-smoke")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(out.glob("*.pdparams"))
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and "dtype" not in config
    text = config["text_config"]
    assert text["num_experts"] == 4 and "num_local_experts" not in text
    assert text["rope_scaling"] == {"rope_type": "default", "mrope_section": [6, 5, 5], "mrope_interleaved": True}
    assert text["rope_theta"] == 5000000.0 and config["vision_config"]["model_type"] == "qwen3_vl_moe"
    manifest = json.loads((out / "vlhub-manifest.json").read_text())["target"]
    assert (manifest["name"], manifest["layout"], manifest["format"]) == ("paddle", "paddleformers", "safetensors")
    loaded = _loaded(out)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state.items())


@pytest.mark.parametrize(("args", "says"), [
    (["download", "qwen3-vl-30b-a3b-fp8"], "an FP8 release"),
    (["convert", "Qwen/Qwen3-VL-235B-A22B-Thinking-FP8", "--to", "paddle", "--dry-run"], "an FP8 release"),
    (["convert", "tiny-qwen3-vl", "--to", "vamc"], "VastAI serves Qwen3-VL through vllm_vacc"),
    (["convert", "tiny-qwen3-vl-moe", "--to", "tpu-mlir"], "takes dense Qwen3-VL only"),
])
def test_refusals_are_one_line(args: list[str], says: str) -> None:
    result = run_vlhub(*args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and says in lines[0], result.stderr


def test_a_moe_with_dense_layers_among_sparse_ones_is_refused(resaved: tuple[Path, dict], tmp_path: Path) -> None:
    directory, _ = resaved
    source = tmp_path / "mixed"
    shutil.copytree(directory, source)
    config = json.loads((source / "config.json").read_text())
    config["text_config"]["mlp_only_layers"] = [1]
    (source / "config.json").write_text(json.dumps(config))
    result = run_vlhub("inspect", str(source))
    assert result.returncode == 2, result.stderr
    assert "mlp_only_layers has 1 entry;" in result.stderr and "every layer is sparse" in result.stderr


def test_the_largest_release_plans_without_data() -> None:
    """Every tensor of Qwen3-VL-235B-A22B, planned from the catalog with no file on this machine."""
    result = run_vlhub("convert", "qwen3-vl-235b-a22b", "--to", "paddle", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["tensors"] == 1388 and plan["target_layout"] == "paddleformers"
    experts = [s for s in plan["steps"] if s["target"].endswith("experts.gate_up_proj")]
    assert len(experts) == 94 and experts[0]["shape_after"] == "128x4096x3072"


@pytest.mark.parametrize("form", ["re-save", "hub", "per-expert"])
def test_a_streamed_reference_reads_one_expert_at_a_time(resaved: tuple[Path, dict], tmp_path: Path,
                                                         form: str) -> None:
    """What the reference computes an expert with is that expert of the official tensor, whichever form holds it."""
    from vlhub.smoke.weights import ModelWeights

    directory, _ = resaved
    source = {"re-save": lambda: directory,
              "hub": lambda: _rewrite_experts(directory, tmp_path / "hub", _hub_form),
              "per-expert": lambda: _rewrite_experts(directory, tmp_path / "per-expert", per_expert)}[form]()
    with ModelWeights.open(source, resident=False) as streamed:
        for name in ("model.language_model.layers.1.mlp.experts.gate_up_proj",
                     "model.language_model.layers.0.mlp.experts.down_proj"):
            whole = streamed.get(name)
            assert all((streamed.entry(name, expert) == whole[expert]).all() for expert in range(4))
