"""`vlhub convert --to paddle-inference` for dense Qwen3-VL: the weights in PaddleFormers' form (the Hugging Face
directory FastDeploy and PaddleFormers load), static vision and text graphs exported from the Paddle network with the
Linear weights transposed as PaddleFormers' loader does, and the smoke test under paddle.inference (vision embeddings
with the DeepStack features, prefill logits, greedy tokens) against the numpy reference: the built-in tiny model and
one transformers saves (untied, head_dim other than hidden / heads, DeepStack on fewer layers than the text has, listed
out of block order). The MoE is refused in one line; exports broken on purpose fail the smoke test."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

paddle = pytest.importorskip("paddle")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.helpers import one_line_error, randomize, run_vlhub
from vlhub.catalog import get_model
from vlhub.formats.readers import open_checkpoint
from vlhub.hub.tiny import ensure_tiny_model
from vlhub.manifest import Manifest
from vlhub.smoke.run import run_smoke
from vlhub.targets import smoke_runner
from vlhub.targets.paddle_inference import static
from vlhub.targets.paddle_inference.static import StaticPredictor

TOKENS = {"image_token_id": 390, "video_token_id": 391, "vision_start_token_id": 392, "vision_end_token_id": 393}
# hidden 64 over 4 heads would be 16 wide: head_dim 24 is the model's own; three text layers, two DeepStack features
# (vision blocks 2 and 0, listed out of block order), untied head, fewer kv heads than heads
HEAD_DIM, DEEPSTACK, HIDDEN = 24, 2, 64
CONFIG = {
    "text_config": {"vocab_size": 400, "hidden_size": HIDDEN, "num_hidden_layers": 3, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "head_dim": HEAD_DIM, "intermediate_size": 128, "rms_norm_eps": 1e-6,
                    "tie_word_embeddings": False,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [4, 4, 4],
                                        "mrope_interleaved": True}},
    "vision_config": {"depth": 3, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "out_hidden_size": HIDDEN,
                      "num_position_embeddings": 64, "deepstack_visual_indexes": [2, 0], "patch_size": 16,
                      "temporal_patch_size": 2, "spatial_merge_size": 2, "hidden_act": "gelu_pytorch_tanh"},
    "tie_word_embeddings": False,
}
# tied, and no DeepStack merger: the vision graph returns [1, image tokens, hidden] and the text graph takes no
# deepstack_embeds
NO_DEEPSTACK = {
    "text_config": {**CONFIG["text_config"], "hidden_size": 48, "num_attention_heads": 3, "num_key_value_heads": 3,
                    "head_dim": 16, "num_hidden_layers": 2, "tie_word_embeddings": True,
                    "rope_parameters": {**CONFIG["text_config"]["rope_parameters"], "mrope_section": [4, 2, 2]}},
    "vision_config": {**CONFIG["vision_config"], "depth": 2, "out_hidden_size": 48, "deepstack_visual_indexes": []},
    "tie_word_embeddings": True,
}




@pytest.fixture(scope="module")
def sources(vlhub_home: Path, module_tmp: Callable[[str], Path]) -> dict[str, Path]:
    """The built-in tiny Qwen3-VL, and checkpoints transformers saves from CONFIG and NO_DEEPSTACK (float32)."""
    made = {"builtin": ensure_tiny_model(get_model("tiny-qwen3-vl"))}
    for name, config in (("transformers", CONFIG), ("no-deepstack", NO_DEEPSTACK)):
        torch.manual_seed(0)
        model = transformers.Qwen3VLForConditionalGeneration(transformers.Qwen3VLConfig(**config, **TOKENS)).eval()
        randomize(model, seed=3)
        made[name] = module_tmp(f"qwen3-vl-{name}") / "hf"
        model.save_pretrained(made[name])
    return made


@pytest.fixture(scope="module")
def layouts(sources: dict[str, Path], module_tmp: Callable[[str], Path]) -> dict[str, tuple[Path, object]]:
    """Each source's layout as `vlhub convert SRC --to paddle-inference --out DIR` writes it, with the run."""
    root = module_tmp("qwen3-vl-inference")
    made = {}
    for name, source in sources.items():
        out = root / name
        made[name] = out, run_vlhub("convert", str(source), "--to", "paddle-inference", "--out", str(out), "--json")
    return made


@pytest.mark.parametrize("name", ["builtin", "transformers", "no-deepstack"])
def test_the_layout_converts_its_smoke_test_passes_and_check_passes(layouts: dict, name: str) -> None:
    out, result = layouts[name]
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)["smoke"]
    assert report["passed"] is True
    stages = {stage["name"] for stage in report["stages"]}
    assert {"vision embeddings", "prefill logits", "generated tokens"} <= stages  # under paddle.inference
    checked = run_vlhub("check", str(out))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "PASS" in checked.stdout


@pytest.mark.parametrize("name", ["builtin", "transformers"])
def test_the_weights_are_paddleformers_form_and_the_graphs_take_deepstack(layouts: dict, name: str) -> None:
    out, _ = layouts[name]
    weights = next(out.glob("*-inference"))
    with open_checkpoint(weights) as checkpoint:
        assert checkpoint.format.name == "safetensors"  # what FastDeploy and PaddleFormers load
        config = checkpoint.config
        assert config is not None
        text = config["text_config"]
        q_proj = checkpoint.tensors["model.language_model.layers.0.self_attn.q_proj.weight"]
        assert q_proj.shape == (text["num_attention_heads"] * text["head_dim"], text["hidden_size"])  # torch [out, in]
    graphs = Manifest.read(out).graphs
    features = len(config["vision_config"]["deepstack_visual_indexes"])
    hidden, head_dim = text["hidden_size"], text["head_dim"]
    assert head_dim != hidden // text["num_attention_heads"]
    assert graphs["vision"]["inputs"] == {"pixel_values": [-1, 3 * 2 * 16 * 16], "vision_position_ids": [-1, 2],
                                          "full_mask": [-1, -1], "interp_indices": [-1, 4], "interp_weights": [-1, 4]}
    layer = {"hidden_states": [-1, hidden], "position_ids": [3, -1],
             "past_key_values": [2, text["num_key_value_heads"], -1, head_dim]}
    # decoder layer j < features adds DeepStack feature j to its output
    assert [graph["inputs"] for graph in graphs["layers"]] == [
        {**layer, "deepstack_embeds": [-1, hidden]} if j < features else layer
        for j in range(text["num_hidden_layers"])]


def test_a_model_without_deepstack_has_no_deepstack_input(layouts: dict) -> None:
    out, _ = layouts["no-deepstack"]
    assert all(list(graph["inputs"]) == ["hidden_states", "position_ids", "past_key_values"]
               for graph in Manifest.read(out).graphs["layers"])


def test_the_vision_graph_returns_the_main_embeddings_then_the_deepstack_features(layouts: dict) -> None:
    out, _ = layouts["transformers"]
    from vlhub.smoke.inputs import smoke_input

    weights = next(out.glob("*-inference"))
    with open_checkpoint(weights) as checkpoint:
        smoke = smoke_input(checkpoint.config)
    assert smoke.vision is not None
    predictor = StaticPredictor(out / "checkpoints", weights)
    try:
        embeds = predictor.encode_images(smoke.pixel_values, **smoke.vision.as_kwargs())
    finally:
        predictor.close()
    assert embeds.shape == (1 + DEEPSTACK, int(smoke.image_mask.sum()), HIDDEN)
    assert all(np.abs(embeds[i] - embeds[j]).max() > 1e-3 for i in range(3) for j in range(i))


def test_legacy_graphs_pass_too(sources: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "legacy"
    result = run_vlhub("convert", str(sources["transformers"]), "--to", "paddle-inference", "--ir", "legacy",
                       "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["smoke"]["passed"] is True
    assert (out / "checkpoints/encode_text/model_layer_0.pdmodel").is_file()
    assert (out / "checkpoints/encode_text/model_head_0.pdmodel").is_file()
    assert (out / "checkpoints/encode_image/vision.pdmodel").is_file()


def test_the_moe_is_refused_in_one_line(vlhub_home: Path, tmp_path: Path) -> None:
    ensure_tiny_model(get_model("tiny-qwen3-vl-moe"))
    line = one_line_error(run_vlhub("convert", "tiny-qwen3-vl-moe", "--to", "paddle-inference",
                                    "--out", str(tmp_path / "moe")))
    assert "dense Qwen3-VL only" in line and "--to paddle" in line and "FastDeploy" in line
    assert not (tmp_path / "moe").exists()


def _deepstack_ignored(h: paddle.Tensor, features: paddle.Tensor) -> paddle.Tensor:
    return h + 0 * features  # the input stays in the graph (Paddle saves no graph with an unused input)


def test_a_text_graph_that_ignores_deepstack_fails_the_smoke_test(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path, vlhub_home: Path) -> None:
    monkeypatch.setattr(static, "add_deepstack", _deepstack_ignored)
    result = run_vlhub("convert", "tiny-qwen3-vl", "--to", "paddle-inference", "--out", str(tmp_path / "broken"),
                       "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)["smoke"]
    assert report["passed"] is False
    failed = [stage["name"] for stage in report["stages"] if not stage["passed"]]
    assert "prefill logits" in failed and not any(name.startswith("weights: ") for name in failed)


def test_a_predictor_that_drops_the_deepstack_rows_fails_the_smoke_test(layouts: dict,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    out, _ = layouts["builtin"]
    original = StaticPredictor._deepstack

    def zeros(self: StaticPredictor, image_embeds: np.ndarray | None, mask: np.ndarray) -> dict[str, np.ndarray]:
        return {name: np.zeros_like(rows) for name, rows in original(self, image_embeds, mask).items()}

    monkeypatch.setattr(StaticPredictor, "_deepstack", zeros)
    report = run_smoke(smoke_runner(out))
    assert not report.passed
    assert next(stage.name for stage in report.stages if not stage.passed) == "prefill logits"
