"""ONNX networks in the sophon-demo / LLM-TPU layout: exported from the tiny models, checked against the
tpu_mlir.md 1.3 contract, run by onnxruntime the way the Sophgo runtime runs them and held to the numpy
reference on the source."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from tests.helpers import q_and_k_swapped, rewrite
from vlhub.deploy import onnx_graph
from vlhub.errors import UserError
from vlhub.formats.writers import file_sha256
from vlhub.keymaps.config import text_config
from vlhub.smoke.inputs import smoke_input
from vlhub.smoke.reference import ReferenceForward, softmax
from vlhub.smoke.verdict import TOLERANCES, compare_arrays
from vlhub.smoke.weights import ModelWeights
from vlhub.targets.tpu_mlir.build import TpuOptions, onnx_compile_script
from vlhub.targets.tpu_mlir.onnx_export import export_onnx
from vlhub.targets.tpu_mlir.onnx_runtime import OnnxPipeline, onnx_outputs

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
SEQ = 128
PATCHES = 128  # the smoke image has 96 patches: 32 rows of padding
TOKENS = 4
EXACT = TOLERANCES["exact"]


@pytest.fixture(scope="module")
def sources(tiny_qwen2_vl: Path, tiny_qwen2_5_vl: Path) -> dict[str, Path]:
    return {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl}


@pytest.fixture(scope="module")
def exports(module_tmp: Callable[[str], Path], sources: dict[str, Path]) -> dict[str, tuple[dict, Path]]:
    root = module_tmp("tpu-onnx")
    made = {}
    for family, source in sources.items():
        with ModelWeights.open(source) as weights:
            made[family] = export_onnx(weights, root / family, seq_length=SEQ, vision_patches=PATCHES), root / family
    return made


def _reference(source: Path, image_size: tuple[int, int] | None = None) -> tuple:
    """(config, smoke input, image embeddings, prompt logits, tokens, token logits) of the numpy reference."""
    with ModelWeights.open(source) as weights:
        smoke = smoke_input(weights.config) if image_size is None else smoke_input(weights.config, image_size)
        forward = ReferenceForward(weights)
        embeds = forward.encode_images(smoke)
        return weights.config, smoke, embeds, *forward.generate(smoke, embeds, TOKENS)


@pytest.fixture(scope="module")
def references(sources: dict[str, Path]) -> dict[str, tuple]:
    return {family: _reference(source) for family, source in sources.items()}


def _contract(config: dict) -> dict[str, tuple[list, list]]:
    """tpu_mlir.md 1.3 per network: inputs and outputs as [name, shape, dtype]."""
    t = text_config(config)
    h, kv, vocab = t["hidden_size"], t["num_key_value_heads"], t["vocab_size"]
    d = h // t["num_attention_heads"]
    s, p = SEQ, PATCHES
    f32, i32, i64 = "float32", "int32", "int64"
    nets = {}
    for i in range(t["num_hidden_layers"]):
        nets[f"block_{i}"] = (
            [["input_states", [1, s, h], f32], ["position_ids", [3, 1, s], i64], ["attention_mask", [1, 1, s, s], f32]],
            [["hidden_states", [1, s, h], f32], ["past_k", [1, s, kv, d], f32], ["past_v", [1, s, kv, d], f32]])
        nets[f"block_cache_{i}"] = (
            [["input_states", [1, 1, h], f32], ["position_ids", [3, 1, 1], i64],
             ["attention_mask", [1, 1, 1, s + 1], f32], ["history_k", [1, s, kv, d], f32],
             ["history_v", [1, s, kv, d], f32]],
            [["hidden_states", [1, 1, h], f32], ["past_k", [1, 1, kv, d], f32], ["past_v", [1, 1, kv, d], f32]])
    nets["embedding"] = [["input_ids", [1, s], i32]], [["hidden_states", [1, s, h], f32]]
    nets["embedding_cache"] = [["input_ids", [1, 1], i32]], [["hidden_states", [1, 1, h], f32]]
    nets["lm_head"] = [["hidden_states", [1, h], f32]], [["m_logits", [1, vocab], f32]]
    nets["greedy_head"] = [["m_logits", [1, vocab], f32]], [["token", [1, 1], i64]]
    nets["penalty_sample_head"] = (
        [["m_logits", [1, vocab], f32], ["input_ids", [1, s], i64], ["top_p", [1], f32], ["temperature", [1], f32],
         ["penalty", [1], f32]],
        [["probs", [1, 50], f32], ["token", [1, 50], i64]])
    vit = [["input_states", [p, 1176], f32], ["position_ids", [p, 2], i32]]
    if config["model_type"] == "qwen2_5_vl":  # llm_convert's names (tpu-mlir python/llm/Qwen2_5VLConverter.py)
        vit += [["full_attn_mask", [1, 1, p, p], f32], ["window_attn_mask", [1, 1, p, p], f32],
                ["reverse_index", [p // 4], i32]]
    else:
        vit += [["attention_mask", [1, p, p], f32]]
    nets["vit"] = vit, [["hidden_states", [p // 4, h], f32]]
    return nets


def _file(network: str) -> str:
    """Where a network is written: the ViT as LLM-TPU's export_onnx.py wrote it, the rest under llm/."""
    return "models/onnx/vit/vision_transformer.onnx" if network == "vit" else f"models/onnx/llm/{network}.onnx"


def _io(values: list) -> list[list]:
    return [[v.name, [d.dim_value for d in v.type.tensor_type.shape.dim],
             onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name] for v in values]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_network_has_the_contracts_names_and_shapes(exports: dict, references: dict, family: str) -> None:
    summary, out = exports[family]
    contract = _contract(references[family][0])
    assert sorted(summary["networks"]) == sorted(contract)
    for name, (inputs, outputs) in contract.items():
        path = out / _file(name)
        model = onnx.load(path, load_external_data=False)
        assert (_io(model.graph.input), _io(model.graph.output)) == (inputs, outputs), name
        assert model.ir_version == 8 and [o.version for o in model.opset_import] == [15]
        onnx.checker.check_model(str(path), full_check=True)  # with shape inference: every node's shapes agree
        assert summary["networks"][name] == {"file": _file(name), "inputs": inputs, "outputs": outputs}
    on_disk = {p.relative_to(out).as_posix(): p for p in out.rglob("*") if p.is_file()}
    assert sorted(summary["files"]) == sorted(on_disk)
    assert all(summary["files"][rel] == {"sha256": file_sha256(p), "size": p.stat().st_size}
               for rel, p in on_disk.items())
    assert not any(rel.endswith(".data") for rel in on_disk)  # tiny graphs keep their weights inside


@pytest.mark.parametrize("family", FAMILIES)
def test_the_vit_is_compiled_as_llm_tpus_runtime_runs_it(exports: dict, family: str) -> None:
    """LLM-TPU's chat.cpp (models/Qwen2_VL/python_demo, models/Qwen2_5_VL/python_demo) looks the ViT up as `vit`
    and copies float32 pixels and masks into it, as llm_convert compiles it: no --quant_input."""
    summary, _ = exports[family]
    script = onnx_compile_script(TpuOptions(SEQ, (168, 112), "w4bf16", 64, "bm1684x"), summary["networks"], "x.bmodel")
    (vit,) = [line.split() for line in script.splitlines() if line.startswith("net vit ")]
    assert vit[2] == "models/onnx/vit/vision_transformer.onnx"
    assert vit[4:] == ["--quantize", "BF16", "--quant_output", "--high_precision"]
    assert "compiled_onnx/vit/vit.bmodel" in script.split("model_tool --combine")[1]


def test_qwen2_5_vl_vit_inputs_have_llm_converts_names(exports: dict) -> None:
    summary, _ = exports["qwen2_5_vl"]
    assert [name for name, _shape, _dtype in summary["networks"]["vit"]["inputs"]] == [
        "input_states", "position_ids", "full_attn_mask", "window_attn_mask", "reverse_index"]


@pytest.mark.parametrize("family", FAMILIES)
def test_onnxruntime_matches_the_reference(exports: dict, references: dict, family: str) -> None:
    config, smoke, embeds, prompt_logits, tokens, token_logits = references[family]
    pipeline = OnnxPipeline(exports[family][1], config)
    produced = pipeline.encode_images(smoke)
    stages = [compare_arrays("vision embeddings", embeds, produced, EXACT)]
    logits, chosen, chosen_from = pipeline.generate(smoke, produced, TOKENS)
    stages += [compare_arrays("prefill logits", prompt_logits, logits, EXACT, top1=True),
               compare_arrays("decode logits", token_logits, chosen_from, EXACT)]
    assert all(stage.passed for stage in stages), stages
    assert max(stage.relative for stage in stages) < 1e-5
    assert chosen == tokens
    forced = onnx_outputs(exports[family][1], config, smoke, tokens)
    assert forced[2] == tokens
    np.testing.assert_array_equal(forced[0], produced)
    np.testing.assert_array_equal(forced[1], logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_smaller_images_are_padded_to_the_vits_rows(exports: dict, sources: dict, family: str) -> None:
    config, smoke, embeds, *_ = _reference(sources[family], (56, 84))
    assert len(smoke.vision.pixel_values) == 24
    produced = OnnxPipeline(exports[family][1], config).encode_images(smoke)
    assert compare_arrays("vision embeddings", embeds, produced, EXACT).passed


def test_an_image_larger_than_the_vit_is_refused(exports: dict, references: dict) -> None:
    config = references["qwen2_vl"][0]
    with pytest.raises(UserError, match="256 patches; the exported ViT takes at most 128"):
        OnnxPipeline(exports["qwen2_vl"][1], config).encode_images(smoke_input(config, (224, 224)))


def _penalty_sample(logits: np.ndarray, ids: np.ndarray, top_p: float, temperature: float,
                    penalty: float) -> tuple[np.ndarray, np.ndarray]:
    """LLM-TPU's PenaltySampleHead in numpy."""
    logits = logits.copy()
    seen = logits[0, ids[0]]
    logits[0, ids[0]] = np.where(seen < 0, seen * penalty, seen / penalty)
    token = np.argsort(-logits[0], kind="stable")[:50]
    top = logits[0, token] / np.float32(temperature)
    keep = (np.cumsum(softmax(top.copy())) < top_p) | (np.arange(50) < 5)
    return softmax(np.where(keep, top, np.float32(-1000)))[None], token[None]


def test_greedy_and_penalty_sample_heads(exports: dict) -> None:
    llm = exports["qwen2_vl"][1] / "models" / "onnx" / "llm"
    greedy = ort.InferenceSession(str(llm / "greedy_head.onnx"), providers=["CPUExecutionProvider"])
    sample = ort.InferenceSession(str(llm / "penalty_sample_head.onnx"), providers=["CPUExecutionProvider"])
    vocab = greedy.get_inputs()[0].shape[1]
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (1, vocab)).astype(np.float32)
    best = int(logits.argmax())
    assert greedy.run(None, {"m_logits": logits})[0].tolist() == [[best]]
    order = np.argsort(-logits[0])
    # the prompt holds the best token (penalised below the rest of the top), a negative one and repeats
    ids = np.concatenate([[best, order[-1]], rng.integers(0, vocab, SEQ - 4), [best, best]])[None].astype(np.int64)
    for top_p, temperature, penalty in ((0.8, 0.7, 1.3), (0.0, 1.0, 1.0), (0.95, 2.0, 50.0)):
        feed = {"m_logits": logits, "input_ids": ids, "top_p": np.array([top_p], np.float32),
                "temperature": np.array([temperature], np.float32), "penalty": np.array([penalty], np.float32)}
        probs, tokens = sample.run(None, feed)
        expected_probs, expected_tokens = _penalty_sample(logits, ids, top_p, temperature, penalty)
        np.testing.assert_array_equal(tokens, expected_tokens)
        np.testing.assert_allclose(probs, expected_probs, atol=1e-6)
        assert (tokens[0, 0] == best) == (penalty == 1.0)
        if top_p == 0.0:  # only the first min_tokens_to_keep survive
            assert (probs[0] > 1e-30).sum() == 5


def test_external_data_is_shared_and_runs_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   sources: dict, exports: dict, references: dict) -> None:
    """Over the threshold, weights go to one data file per group; tiny models cross it when it is 0."""
    monkeypatch.setattr(onnx_graph, "EXTERNAL_DATA_BYTES", 0)
    monkeypatch.setattr(onnx_graph, "_BLOCK_BYTES", 1 << 20)  # the embedding streamed in several row blocks
    written: list[int] = []
    with ModelWeights.open(sources["qwen2_5_vl"]) as weights:
        summary = export_onnx(weights, tmp_path, seq_length=SEQ, vision_patches=PATCHES, on_bytes=written.append)
        float32_bytes = sum(4 * int(np.prod(step.target.shape)) for step in weights.plan.steps)
        tensors = len(weights.plan.steps)
    assert sum(written) == sum(entry["size"] for entry in summary["files"].values())
    data = sorted(rel for rel in summary["files"] if rel.endswith(".data"))
    assert data == ["models/onnx/llm/block_0.onnx.data", "models/onnx/llm/block_1.onnx.data",
                    "models/onnx/llm/embedding.onnx.data", "models/onnx/vit/vision_transformer.onnx.data"]
    llm = tmp_path / "models" / "onnx" / "llm"
    locations = {name: {entry.value for t in onnx.load(llm / f"{name}.onnx", load_external_data=False).graph.initializer
                        for entry in t.external_data if entry.key == "location"}
                 for name in ("block_1", "block_cache_1", "embedding", "embedding_cache", "lm_head")}
    assert locations["block_1"] == locations["block_cache_1"] == {"block_1.onnx.data"}
    # tied embeddings: the lm_head reads the embedding's table (and norm) from the embedding's file
    assert locations["embedding"] == locations["embedding_cache"] == locations["lm_head"] == {"embedding.onnx.data"}
    # weights written once: the data files hold each float32 tensor once, plus page alignment
    data_bytes = sum(summary["files"][rel]["size"] for rel in data)
    assert float32_bytes <= data_bytes < float32_bytes + 4096 * tensors
    config, smoke, _, _, tokens, _ = references["qwen2_5_vl"]
    pipeline = OnnxPipeline(tmp_path, config, resident=False)
    inline = OnnxPipeline(exports["qwen2_5_vl"][1], config)
    produced = pipeline.encode_images(smoke)
    np.testing.assert_array_equal(produced, inline.encode_images(smoke))
    logits, chosen, _ = pipeline.generate(smoke, produced, TOKENS)
    np.testing.assert_array_equal(logits, inline.generate(smoke, produced, 1)[0])
    assert chosen == tokens


def test_swapped_q_and_k_in_one_layer_fails_the_comparison(tmp_path: Path, sources: dict, references: dict) -> None:
    broken = rewrite(sources["qwen2_vl"], tmp_path / "broken", q_and_k_swapped)
    with ModelWeights.open(broken) as weights:
        export_onnx(weights, tmp_path / "out", seq_length=SEQ, vision_patches=PATCHES)
    config, smoke, embeds, prompt_logits, tokens, _ = references["qwen2_vl"]
    produced, logits, _ = onnx_outputs(tmp_path / "out", config, smoke, tokens)
    assert compare_arrays("vision embeddings", embeds, produced, EXACT).passed  # the vision tower is intact
    stage = compare_arrays("prefill logits", prompt_logits, logits, EXACT, top1=True)
    assert not stage.passed and stage.relative > 1e-2, stage


def test_export_refuses_what_the_networks_cannot_hold(tmp_path: Path, sources: dict, tiny_qwen_vl: Path) -> None:
    with ModelWeights.open(sources["qwen2_vl"]) as weights:
        for kwargs, message in (({"seq_length": SEQ, "vision_patches": 126}, "multiple of 4"),
                                ({"seq_length": 16, "vision_patches": PATCHES}, "cannot hold the 32 tokens")):
            with pytest.raises(UserError, match=message):
                export_onnx(weights, tmp_path / "out", **kwargs)
    with ModelWeights.open(tiny_qwen_vl) as weights, pytest.raises(UserError, match="no TPU-MLIR route"):
        export_onnx(weights, tmp_path / "out", seq_length=SEQ, vision_patches=PATCHES)
    assert not (tmp_path / "out").exists()
