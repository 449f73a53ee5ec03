"""A fresh Qwen2-VL, Qwen2.5-VL and Qwen3-VL, saved by transformers with dims, vocabularies and shard counts that
no fixture of this project has, go through the real `vlhub convert` entry point to every target it has a route to,
with its default smoke test: exit 0, verdict passed, each target's weights as transformers loads them equal to the
model's."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conformance.factory import FRESH, FRESH_TARGETS, save_checkpoint
from tests.conformance.judge import CONVERT_TARGETS, judge_conversion
from tests.helpers import run_vlhub_subprocess


@pytest.mark.parametrize("family", FRESH)
def test_a_fresh_checkpoint_converts_to_every_target(family: str, tmp_path: Path) -> None:
    spec = FRESH[family]
    source = tmp_path / "source"
    expected = dict(save_checkpoint(spec, source).state_dict())
    assert len(list(source.glob("model-*.safetensors"))) > 1
    for target in FRESH_TARGETS.get(family, CONVERT_TARGETS):
        out = tmp_path / target
        result = run_vlhub_subprocess("convert", str(source), "--to", target, "--out", str(out))
        assert result.returncode == 0, f"--to {target}: {result.stderr}"
        judge_conversion(spec, target, out, expected)
