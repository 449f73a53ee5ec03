"""`vlhub convert --to tpu-mlir` for Qwen3.5, dense and MoE (llm_convert's Qwen3_5Converter takes qwen3_5 and
qwen3_5_moe): model/ as it reads it (the nested config.json in the official spelling, `rope_parameters` with the
partial rotary factor, official names, no multi-token-prediction head), compile.sh with --dynamic and the reason it
is forced, the networks, the smoke test passing; the refusals (--onnx, key and value heads of different widths, a
--group-size that does not divide the experts' width, full-attention layers where LLM-TPU's runtime does not run
them)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.helpers import one_line_error, run_vlhub
from vlhub.formats.readers import open_checkpoint
from vlhub.hub.sources import resolve_source

# the smoke image (112x168) is resized up to the processor's 65536-pixel floor: 224x320, 14x20 patches, 70 tokens
SMALL = ["--seq-length", "256", "--max-pixels", "320x224"]


@pytest.mark.parametrize("name", ["tiny-qwen3.5", "tiny-qwen3.5-moe"])
def test_the_tiny_models_model_directory_compile_script_and_smoke(name: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_vlhub("convert", name, "--to", "tpu-mlir", "--out", str(out), *SMALL, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["smoke"]["passed"]
    config = json.loads((out / "model" / "config.json").read_text())
    text = config["text_config"]
    assert config["model_type"] == ("qwen3_5_moe" if name.endswith("moe") else "qwen3_5")
    # Qwen3_5Converter reads text_config.rope_parameters (the releases' own spelling), partial rotary included
    assert text["rope_parameters"]["partial_rotary_factor"] == 0.25 and "rope_scaling" not in text
    assert text["layer_types"] == json.loads((resolve_source(name) / "config.json").read_text())["text_config"][
        "layer_types"]
    with open_checkpoint(out / "model") as checkpoint:
        names = list(checkpoint.tensors)
    assert "model.language_model.layers.0.linear_attn.A_log" in names and not any(n.startswith("mtp.") for n in names)
    script = (out / "compile.sh").read_text()
    assert "--dynamic" in script and "Qwen3_5Converter always compiles dynamic networks" in script
    target = json.loads((out / "vlhub-manifest.json").read_text())["target"]
    assert target["dynamic"] is True and target["networks"][:4] == ["vit", "embedding", "embedding_cache", "lm_head"]
    assert "models/Qwen3_5/python_demo" in (out / "README.md").read_text()


@pytest.mark.parametrize(("edit", "args", "message"), [
    ({}, ["--onnx"], "--onnx exports the older flow's networks .* no Qwen3.5"),
    ({"linear_value_head_dim": 32}, [], ("linear_key_head_dim 16 and linear_value_head_dim 32: TPU-MLIR's "
                                         "llm_convert compiles only models where they are equal")),
    ({}, ["--group-size", "128"], "--group-size 128: it must divide .*moe_intermediate_size 64"),
])
def test_what_llm_convert_cannot_take_is_refused_in_one_line(edit: dict, args: list[str], message: str,
                                                              tmp_path: Path) -> None:
    source = shutil.copytree(resolve_source("tiny-qwen3.5-moe"), tmp_path / "source")
    config = json.loads((source / "config.json").read_text())
    config["text_config"].update(edit)
    (source / "config.json").write_text(json.dumps(config))
    result = run_vlhub("convert", str(source), "--to", "tpu-mlir", "--out", str(tmp_path / "out"), *SMALL, *args)
    assert re.search(message, one_line_error(result))
    assert not (tmp_path / "out").exists()


def test_full_attention_where_llm_tpu_does_not_run_it_is_refused_in_one_line(tmp_path: Path) -> None:
    """LLM-TPU's runtime runs layer i as full attention exactly when (i + 1) % 4 == 0: a checkpoint transformers
    saved with full attention first is refused before anything is written."""
    import transformers

    from tests.families.qwen3_5_models import qwen3_5_text, qwen3_5_vision
    from tests.helpers import QWEN3_TOKENS

    text = qwen3_5_text(64, 4, 4, 2, 32, [2, 1, 1], (2, 4, 16),
                        layer_types=["full_attention"] + ["linear_attention"] * 3)
    config = transformers.Qwen3_5Config(text_config=text, vision_config=qwen3_5_vision(32, 1, 2, 64), **QWEN3_TOKENS)
    transformers.Qwen3_5ForConditionalGeneration(config).save_pretrained(tmp_path / "source")
    result = run_vlhub("convert", str(tmp_path / "source"), "--to", "tpu-mlir", "--out", str(tmp_path / "out"), *SMALL)
    line = one_line_error(result)
    assert re.search(r"layer_types puts full attention at layers \[0\]; LLM-TPU's runtime \(models/Qwen3_5/", line)
    assert not (tmp_path / "out").exists()
    assert run_vlhub("convert", str(tmp_path / "source"), "--to", "safetensors", "--out", str(tmp_path / "sf"),
                     "--no-smoke").returncode == 0  # the other targets take it


def test_the_smoke_title_holds_model_to_the_source_and_the_toolchain_text_names_the_docs(tmp_path: Path) -> None:
    """The smoke table named model/ '(reference)', as if it were the side it is held to; the README, compile.sh and
    check sent users to a README section that is docs/targets/tpu-mlir.md's."""
    out = tmp_path / "out"
    result = run_vlhub("convert", "tiny-qwen3.5", "--to", "tpu-mlir", "--out", str(out))
    assert result.returncode == 0, result.stderr
    title = "".join(result.stdout.split())  # the title wraps where the terminal width puts it
    assert "/model(numpy)vs" in title and "tiny-qwen3.5" in title, result.stdout
    assert "(reference)" not in title
    where = "docs/targets/tpu-mlir.md in vlhub's source, section 'The TPU-MLIR toolchain'"
    for name in ("README.md", "compile.sh"):
        text = " ".join((out / name).read_text().split())
        assert where in text and "vlhub's README" not in text, name
    docs = Path(__file__).parents[3] / "docs" / "targets" / "tpu-mlir.md"
    assert "\n## The TPU-MLIR toolchain" in docs.read_text()
