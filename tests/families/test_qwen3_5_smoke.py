"""Qwen3.5's smoke test and plan: the built-in tiny models convert and pass their default smoke test (--to paddle and
tpu-mlir: test_qwen3_5_paddle.py, tests/targets/tpu_mlir/test_qwen3_5.py), and conversions
broken in ways only this family can be broken fail it: a linear-attention layer's decay constants swapped (A_log
and dt_bias are both one number per value head), a `1 + w` norm stored as the scale it applies (w + 1, what a loader
that adds the 1 at load would leave behind) and the linear-attention output norm, which is a plain `w`, stored
zero-centred as the others are."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import Tensors, rewrite, run_vlhub
from vlhub.hub.sources import resolve_source

LAYER = "model.language_model.layers.1."  # a linear-attention layer (layer 3 is the full-attention one)


def decay_constants_swapped(tensors: Tensors) -> Tensors:
    a_log, dt_bias = LAYER + "linear_attn.A_log", LAYER + "linear_attn.dt_bias"
    tensors[a_log], tensors[dt_bias] = tensors[dt_bias].copy(), tensors[a_log].copy()
    return tensors


def norm_stored_as_its_scale(tensors: Tensors) -> Tensors:
    tensors[LAYER + "input_layernorm.weight"] += 1
    return tensors


def output_norm_stored_zero_centred(tensors: Tensors) -> Tensors:
    tensors[LAYER + "linear_attn.norm.weight"] -= 1
    return tensors


@pytest.mark.parametrize(("name", "target"), [("tiny-qwen3.5", "safetensors"), ("tiny-qwen3.5-moe", "torch")])
def test_the_tiny_models_convert_and_pass_their_smoke_test(name: str, target: str, tmp_path: Path) -> None:
    result = run_vlhub("convert", name, "--to", target, "--out", str(tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr
    smoke = json.loads(result.stdout)["smoke"]
    assert smoke["passed"] and smoke["tokens_out"] == smoke["tokens_ref"]


@pytest.mark.parametrize("defect", [decay_constants_swapped, norm_stored_as_its_scale, output_norm_stored_zero_centred])
def test_a_conversion_broken_where_only_qwen3_5_can_be_fails_the_smoke_test(defect, tmp_path: Path) -> None:
    source = resolve_source("tiny-qwen3.5")
    broken = rewrite(source, tmp_path / "broken", defect)
    result = run_vlhub("smoke", str(broken), "--against", str(source), "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert not report["passed"]
    failed = {stage["name"] for stage in report["stages"] if not stage["passed"]}
    assert "prefill logits" in failed


def test_the_defects_change_what_the_layer_computes() -> None:
    """Each defect changes the tensors it names (the tiny model's values are not symmetric under it)."""
    from vlhub.smoke.weights import ModelWeights

    with ModelWeights.open(resolve_source("tiny-qwen3.5"), resident=True) as weights:
        tensors = {name: weights.get(name).copy() for name in (LAYER + "linear_attn.A_log",
                                                              LAYER + "linear_attn.dt_bias")}
    assert not np.allclose(tensors[LAYER + "linear_attn.A_log"], tensors[LAYER + "linear_attn.dt_bias"], atol=0.1)


@pytest.mark.parametrize("name", ["tiny-qwen3.5", "qwen3.5-397b-a17b"])
def test_plan_sizes_qwen3_5_as_its_processor_does_and_says_tpu_mlir_compiles_it_dynamic(name: str) -> None:
    result = run_vlhub("plan", name, "--image", "1920x1080", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["family"] == "qwen3_5"
    assert [(item["grid"], item["tokens"]) for item in plan["inputs"]] == [([1, 68, 120], 2040)]
    assert "Qwen3_5Converter" in plan["targets"]["tpu-mlir"]["dynamic"]
    assert "vamc" not in plan["targets"]
