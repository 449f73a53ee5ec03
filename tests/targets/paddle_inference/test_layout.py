"""`vlhub convert --to paddle-inference`: the layout, its static graphs under paddle.inference, its smoke test."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import rewrite, run_vlhub, run_vlhub_subprocess, untransposed_square
from vlhub.convert.conversion import open_source
from vlhub.formats.readers import open_checkpoint
from vlhub.hub.sources import locate_source
from vlhub.hub.store import conversion_output
from vlhub.smoke.run import run_smoke
from vlhub.targets import smoke_runner
from vlhub.targets.paddle_inference.target import PADDLE_INFERENCE, PaddleInferenceOptions

NAMES = {"tiny-qwen-vl": "qwen", "tiny-qwen2-vl": "model", "tiny-qwen2.5-vl": "model"}
# the graph file each family's layout is written with by default: PaddleMIX's Qwen-VL static predictor
# (deploy/qwen_vl/run_static_predict.py) opens `<path>.pdmodel`; Qwen2(.5)-VL get Paddle 3's pir
SUFFIX = {"tiny-qwen-vl": ".pdmodel", "tiny-qwen2-vl": ".json", "tiny-qwen2.5-vl": ".json"}


def build(model: str, out: Path) -> Path:
    """The layout of `model` with the default options, as `vlhub convert --to paddle-inference` builds it."""
    with open_source(locate_source(model)) as source:
        spec = PADDLE_INFERENCE.settle(PaddleInferenceOptions(), source.model, smoke=True)
        conversion = source.plan(PADDLE_INFERENCE.output, dtype=spec.dtype)
        PADDLE_INFERENCE.build(conversion, spec, out, overwrite=False, on_bytes=None)
    return out


def cache_entry(model: str, ir: str | None = None) -> Path:
    """Where `vlhub convert MODEL --to paddle-inference [--ir IR]` puts the layout without --out."""
    with open_source(locate_source(model)) as source:
        spec = PADDLE_INFERENCE.settle(PaddleInferenceOptions(ir=ir), source.model, smoke=False)
    return conversion_output(source.source, PADDLE_INFERENCE.name, spec.cache_key())


@pytest.fixture(scope="module")
def layouts(module_tmp: Callable[[str], Path], tiny_qwen_vl: Path, tiny_qwen2_vl: Path,
            tiny_qwen2_5_vl: Path) -> dict[str, Path]:
    root = module_tmp("inference")
    return {model: build(model, root / model) for model in NAMES}


@pytest.mark.parametrize("model", list(NAMES))
def test_layout_holds_weights_graphs_manifest_and_readme(layouts: dict[str, Path], model: str) -> None:
    out = layouts[model]
    prefix = NAMES[model]
    weights = out / f"{model}-inference"
    config = json.loads((weights / "config.json").read_text())
    assert not list(out.glob("checkpoints/encode_text/*_decode*"))  # one graph serves prefill and decode
    suffix = SUFFIX[model]
    graphs = out / "checkpoints"
    # a graph per decoder layer and per block of the output projection: one of each at these sizes
    text = [f"encode_text/{prefix}_{part}" for part in [f"layer_{i}" for i in range(config["num_hidden_layers"])]
            + ["head_0"]]
    for path in (weights / "generation_config.json", out / "README.md",
                 *(graphs / f"{graph}{ending}" for graph in ["encode_image/vision", *text]
                   for ending in (suffix, ".pdiparams"))):
        assert path.is_file(), path
    assert not (graphs / f"encode_text/{prefix}_head_1{suffix}").exists()
    manifest = json.loads((out / "vlhub-manifest.json").read_text())
    assert [graph["model"] for graph in manifest["graphs"]["layers"]] == [f"checkpoints/{t}{suffix}" for t in text[:-1]]
    assert [graph["vocab"] for graph in manifest["graphs"]["head"]] == [[0, config["vocab_size"]]]
    assert manifest["target"]["name"] == "paddle-inference"
    for name, entry in manifest["files"].items():
        assert (out / name).stat().st_size == entry["size"], name
    with open_checkpoint(weights) as checkpoint:
        names = set(checkpoint.tensors)
        dtypes = {meta.dtype for meta in checkpoint.tensors.values()}
    if model == "tiny-qwen-vl":
        assert config["model_type"] == "qwen" and config["dtype"] == "float16"
        assert {"qwen.wte.weight", "qwen.h.0.attn.c_attn.weight", "qwen.ln_f.weight", "lm_head.weight"} <= names
        assert not any(n.startswith(("transformer.", "qwen.llm.")) for n in names)
        assert dtypes == {"float16"}  # never bf16-as-uint16, which QWenInferenceModel reads as numbers
        assert Path(config["llm_pretrained_model_name_or_path"]) == weights.absolute()
    else:
        assert config["model_type"] == model.removeprefix("tiny-").replace("-", "_").replace(".", "_")
        assert "model.embed_tokens.weight" in names and dtypes == {"bfloat16"}


@pytest.mark.parametrize("model", list(NAMES))
def test_layout_passes_its_smoke_test_through_paddle_inference(layouts: dict[str, Path], model: str) -> None:
    report = run_smoke(smoke_runner(layouts[model]))
    assert report.runtime == "paddle-inference"
    assert report.passed, report.as_dict()
    assert report.tokens_out == report.tokens_ref
    assert {s.name for s in report.stages} >= {"prefill logits", "generated tokens", "weights: prefill logits"}


@pytest.mark.parametrize("model", list(NAMES))
def test_the_readmes_runner_chains_the_graphs_as_vlhubs_predictor_does(layouts: dict[str, Path], model: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from vlhub.targets.paddle_inference.static import StaticPredictor, _cache_shape

    out = layouts[model]
    readme = (out / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(out)
    runner: dict = {}
    exec(code, runner)  # noqa: S102 - the README's own code, as a user would paste it
    predictor = StaticPredictor(out / "checkpoints", out / f"{model}-inference")
    try:
        ids = np.arange(3, 11)
        positions = np.arange(8) if model == "tiny-qwen-vl" else np.tile(np.arange(8), (3, 1))
        empty = [np.zeros(_cache_shape(predictor.network, 0), np.float32)] * predictor.network.layers
        hidden = predictor._embed(ids)
        expected, expected_caches = predictor.step(hidden, positions, list(empty), {})
        logits, caches = runner["step"](hidden, positions, list(empty))
    finally:
        predictor.close()
    np.testing.assert_array_equal(logits, expected)
    for cache, expected_cache in zip(caches, expected_caches, strict=True):
        np.testing.assert_array_equal(cache, expected_cache)


@pytest.mark.parametrize("model", list(NAMES))
def test_the_default_ir_is_the_one_the_familys_consumer_reads(layouts: dict[str, Path], model: str) -> None:
    out = layouts[model]
    ir = "legacy" if SUFFIX[model] == ".pdmodel" else "pir"
    assert json.loads((out / "vlhub-manifest.json").read_text())["target"]["ir"] == ir
    other = ".json" if ir == "legacy" else ".pdmodel"
    assert not [p for p in out.glob(f"checkpoints/*/*{other}") if p.name != "config.json"]
    readme = (out / "README.md").read_text()
    assert f"These graphs are `{ir}`" in readme and "`deploy/qwen_vl/run_static_predict.py`) opens `<path>.pdmodel`" \
        in readme


@pytest.mark.parametrize(("model", "default"), [("tiny-qwen-vl", "legacy"), ("tiny-qwen2-vl", "pir")])
def test_the_cache_key_is_the_ir_written(model: str, default: str) -> None:
    """A default that depends on the family keys the cache as that IR given: one entry, never the other's."""
    other = "pir" if default == "legacy" else "legacy"
    assert cache_entry(model) == cache_entry(model, ir=default)
    assert cache_entry(model) != cache_entry(model, ir=other)


def test_a_broken_inference_weight_fails_the_smoke_test(layouts: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(layouts["tiny-qwen2-vl"], broken)
    weights = broken / "tiny-qwen2-vl-inference"
    rewritten = rewrite(weights, tmp_path / "weights", untransposed_square)
    shutil.rmtree(weights)
    rewritten.rename(weights)
    report = run_smoke(smoke_runner(broken))
    assert not report.passed
    assert next(s.name for s in report.stages if not s.passed).startswith("weights: ")


def test_cli_convert_legacy_ir_and_bad_input(tmp_path: Path, tiny_qwen2_vl: Path, tiny_qwen_vl: Path) -> None:
    out = tmp_path / "legacy"
    result = run_vlhub("convert", "tiny-qwen2-vl", "--to", "paddle-inference", "--ir", "legacy", "--out", str(out),
                       "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["smoke"]["passed"] is True
    assert (out / "checkpoints/encode_text/model_layer_0.pdmodel").is_file()
    refused = run_vlhub("convert", "tiny-qwen-vl", "--to", "paddle-inference", "--dtype", "bfloat16",
                        "--out", str(tmp_path / "bf16"))
    assert refused.returncode == 2 and "16256" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "bf16").exists()
    again = run_vlhub("convert", "tiny-qwen2-vl", "--to", "paddle-inference", "--out", str(out))
    assert again.returncode == 2 and "--overwrite" in again.stderr
    wrong = run_vlhub("convert", "tiny-qwen2-vl", "--to", "paddle", "--ir", "legacy", "--out", str(tmp_path / "x"))
    assert wrong.returncode == 2 and "--ir does not apply to --to paddle (it applies to --to paddle-inference)" in wrong.stderr


def test_a_max_seq_len_past_qwen_vls_seq_length_is_refused_before_writing(tmp_path: Path) -> None:
    """Checked with plan's own check: past seq_length 2048 Qwen-VL scales its rotary, which the graph does not."""
    result = run_vlhub("convert", "tiny-qwen-vl", "--to", "paddle-inference", "--max-seq-len", "4096",
                       "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "4096 positions pass Qwen-VL's seq_length 2048" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_without_paddle_the_export_is_refused_before_writing(tmp_path: Path, tiny_qwen2_vl: Path) -> None:
    shadow = tmp_path / "shadow" / "paddle"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'paddle'\")\n")
    # a fresh interpreter: PYTHONPATH is read at start-up, and this process has paddle imported already
    result = run_vlhub_subprocess("convert", "tiny-qwen2-vl", "--to", "paddle-inference", "--out",
                                  str(tmp_path / "out"), env={"PYTHONPATH": str(shadow.parent)})
    assert result.returncode == 2
    assert "pip install 'vlhub[paddle]'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
