"""Qwen3.5's Paddle network over `--to paddle`'s PaddleFormers form (the official names and shapes in safetensors,
Linear weights transposed as they load): the built-in tiny models and checkpoints transformers saved (dense, and the
MoE one expert at a time) pass their default smoke test in Paddle, resident and streamed (one layer in memory, its
token mixer read as it runs) alike, and a conversion with a linear-attention layer's decay constants swapped fails
it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.families.qwen3_5_models import build
from tests.helpers import rewrite, run_vlhub
from vlhub.hub.sources import resolve_source

pytest.importorskip("paddle")


def converted(source: str, out: Path, *extra: str) -> dict:
    result = run_vlhub("convert", source, "--to", "paddle", "--out", str(out), "--json", *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["smoke"]


@pytest.mark.parametrize("name", ["tiny-qwen3.5", "tiny-qwen3.5-moe"])
def test_the_tiny_models_pass_their_default_smoke_test_in_paddle(name: str, tmp_path: Path) -> None:
    smoke = converted(name, tmp_path / "out")
    assert smoke["passed"] and smoke["runtime"] == "paddle" and smoke["tokens_out"] == smoke["tokens_ref"]
    streamed = run_vlhub("smoke", str(tmp_path / "out"), "--streamed", "--json")
    assert streamed.returncode == 0, streamed.stderr
    report = json.loads(streamed.stdout)
    assert report["passed"] and report["streamed"]


@pytest.mark.parametrize("case", ["dense", "moe"])
def test_checkpoints_transformers_saved_pass_in_paddle(case: str, tmp_path: Path) -> None:
    build(case).save_pretrained(tmp_path / "source")
    smoke = converted(str(tmp_path / "source"), tmp_path / "out")
    assert smoke["passed"] and smoke["runtime"] == "paddle"
    names = json.loads(next((tmp_path / "out").glob("*.index.json")).read_text())["weight_map"] \
        if any((tmp_path / "out").glob("*.index.json")) else None
    assert names is None or "model.language_model.layers.0.linear_attn.A_log" in names


def test_a_paddle_conversion_with_the_decay_constants_swapped_fails_in_paddle(tmp_path: Path) -> None:
    converted("tiny-qwen3.5", tmp_path / "good", "--no-smoke")
    layer = "model.language_model.layers.0.linear_attn."

    def swapped(tensors: dict) -> dict:
        tensors[layer + "A_log"], tensors[layer + "dt_bias"] = tensors[layer + "dt_bias"], tensors[layer + "A_log"]
        return tensors

    broken = rewrite(tmp_path / "good", tmp_path / "broken", swapped)
    result = run_vlhub("smoke", str(broken), "--against", str(resolve_source("tiny-qwen3.5")), "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["runtime"] == "paddle" and not report["passed"]
