"""A fresh Qwen2-VL and Qwen2.5-VL, saved by transformers with dims, vocabularies and shard counts that no
fixture of this project has, go through the real `vlhub convert` entry point to every target with its default
smoke test: exit 0, verdict passed, each target's weights as transformers loads them equal to the model's."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conformance.factory import CheckpointSpec, SpecialTokens, TextDims, VisionDims, save_checkpoint
from tests.conformance.test_commands import CONVERT_TARGETS, judge_conversion
from tests.conftest import run_vlhub

# head_dim 64 and intermediate 320 keep llm_convert's default quantization groups (64) whole; vision heads
# are 80 wide as llm_convert requires; the special tokens sit inside a 3001-token vocabulary
_TEXT = TextDims(vocab=3001, heads=3, kv_heads=1, head_dim=64, intermediate=320, layers=2, tied=False,
                 mrope_section=(8, 12, 12), rope_theta=1000000.0)
_TOKENS = SpecialTokens(image=2999, video=3000, vision_start=2997, vision_end=2998, bos=2995, eos=2996)
FRESH = {
    "qwen2_vl": CheckpointSpec("qwen2_vl", _TEXT, VisionDims(2, 2, 80, 320, 2, 112, ()), _TOKENS, "bfloat16",
                               "official", max_shard_size=1_000_000, seed=7),
    "qwen2_5_vl": CheckpointSpec("qwen2_5_vl", _TEXT, VisionDims(2, 2, 80, 256, 2, 112, (1,)), _TOKENS, "bfloat16",
                                 "official", max_shard_size=1_000_000, seed=8, with_tokenizer=True),
}


@pytest.mark.parametrize("family", FRESH)
def test_a_fresh_checkpoint_converts_to_every_target(family: str, tmp_path: Path) -> None:
    spec = FRESH[family]
    source = tmp_path / "source"
    expected = dict(save_checkpoint(spec, source).state_dict())
    assert len(list(source.glob("model-*.safetensors"))) > 1
    for target in CONVERT_TARGETS:
        out = tmp_path / target
        result = run_vlhub("convert", str(source), "--to", target, "--out", str(out))
        assert result.returncode == 0, f"--to {target}: {result.stderr}"
        judge_conversion(spec, target, out, expected)
