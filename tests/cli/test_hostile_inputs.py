"""Hostile input refused by the commands before any work, in one line: config.json values and JSON that would
hang, recurse or crash, and a safetensors header the reference library rejects (the readers' own refusals, of every
header, index and row read: tests/unit/test_hostile_formats.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import header_entry, run_vlhub, safetensors_with_header, with_config_text
from vlhub.catalog import get_model

# --- config.json -------------------------------------------------------------------------------------------


def _edited(edit: Callable[[dict], None]) -> str:
    config = json.loads(json.dumps(get_model("tiny-qwen2-vl").config))
    edit(config)
    return json.dumps(config)


def _replaced(old: str, new: str) -> str:
    """tiny-qwen2-vl's config.json text with `old` replaced by `new`: JSON no dict can hold."""
    text = json.dumps(get_model("tiny-qwen2-vl").config)
    assert old in text
    return text.replace(old, new, 1)


# (config.json text, or None for a symbolic link loop; what the one error line must name)
HOSTILE_CONFIGS: dict[str, tuple[str | None, str]] = {
    "a million layers": (_edited(lambda c: c.update(num_hidden_layers=1_000_000)), "num_hidden_layers is 1000000"),
    "a million vision blocks": (_edited(lambda c: c["vision_config"].update(depth=1_000_000)),
                                "vision_config.depth is 1000000"),
    "zero heads": (_edited(lambda c: c.update(num_attention_heads=0)), "num_attention_heads is 0"),
    "heads not dividing the width": (_edited(lambda c: c.update(num_attention_heads=3, num_key_value_heads=1)),
                                     "hidden_size 128 is not a multiple of num_attention_heads 3"),
    "kv heads not dividing the heads": (_edited(lambda c: c.update(num_key_value_heads=3)),
                                        "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    "text for a number": (_edited(lambda c: c.update(hidden_size="128")), "hidden_size is '128'"),
    "a fractional count": (_edited(lambda c: c.update(num_hidden_layers=2.5)), "num_hidden_layers is 2.5"),
    "a boolean width": (_edited(lambda c: c.update(intermediate_size=True)), "intermediate_size is True"),
    "an absurd vocabulary": (_edited(lambda c: c.update(vocab_size=10**12)), "vocab_size is 1000000000000"),
    "NaN": (_replaced('"rms_norm_eps": 1e-06', '"rms_norm_eps": NaN'), "NaN is not a JSON number"),
    "an infinite ratio": (_replaced('"mlp_ratio": 4', '"mlp_ratio": 1e999'), "1e999 does not fit a float"),
    "5000-digit integer": (_replaced('"vocab_size": 151936', '"vocab_size": ' + "9" * 5000),
                           "an integer of 5000 digits"),
    "deep nesting": (_replaced('"rope_scaling": {', '"x": ' + "[" * 100_000 + "]" * 100_000 + ', "rope_scaling": {'),
                     "nested more than 64 levels deep"),
    "no model_type": (_edited(lambda c: c.pop("model_type")), "has no model_type"),
    "non-numeric positions": (_edited(lambda c: c.update(max_position_embeddings="abc")),
                              "max_position_embeddings is 'abc'"),
    "zero vision heads": (_edited(lambda c: c["vision_config"].update(num_heads=0)), "vision_config.num_heads is 0"),
    "vision heads not dividing the vision width": (_edited(lambda c: c["vision_config"].update(num_heads=3)),
                                                   "is not a multiple of vision_config.num_heads 3"),
    "a symbolic link loop": (None, "loop of symbolic links"),
}
COMMANDS = {
    "inspect": ("inspect", "{dir}"),
    "convert": ("convert", "{dir}", "--to", "paddle", "--dry-run"),
    "keys": ("keys", "{dir}", "--rename", "model.=llm.", "--dry-run"),
    "plan": ("plan", "{dir}", "--image", "640x480"),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", HOSTILE_CONFIGS)
def test_hostile_configs_are_one_line_exit_2(tiny_qwen2_vl: Path, tmp_path: Path, case: str, command: str) -> None:
    text, named = HOSTILE_CONFIGS[case]
    directory = with_config_text(tiny_qwen2_vl, tmp_path / "model", text)
    result = run_vlhub(*(arg.format(dir=directory) for arg in COMMANDS[command]))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert named in result.stderr


def test_debug_shows_the_traceback(tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    directory = with_config_text(tiny_qwen2_vl, tmp_path / "model", HOSTILE_CONFIGS["zero heads"][0])
    result = run_vlhub("inspect", str(directory), env={"VLHUB_DEBUG": "1"})
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_a_hostile_header_through_the_cli(tmp_path: Path) -> None:
    half = 1 << 19  # a gap between tensors, as in tests/unit/test_hostile_formats.py
    gap = {"a": header_entry("U8", [half - 8], 0, half - 8), "b": header_entry("U8", [half], half, 2 * half)}
    safetensors_with_header(tmp_path / "model.safetensors", gap, bytes(2 * half))
    result = run_vlhub("inspect", str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert "bytes after tensor 'a' belong to no tensor" in result.stderr


