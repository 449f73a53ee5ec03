"""The `vlhub` command line as a user runs it: output streams, exit codes, one-line errors.

The errors are checked on the real entry point (`python -m vlhub`, a fresh interpreter): its streams and exit
codes are the subject here; every other test module runs commands in-process (tests/helpers.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import one_line_error, run_vlhub, run_vlhub_subprocess
from vlhub.catalog import models


def test_models_json_lists_every_model_with_its_fields() -> None:
    result = run_vlhub("models", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == list(models())
    assert {r["name"] for r in rows} >= {"qwen2-vl-7b", "tiny-qwen2.5-vl", "qwen3-vl-30b-a3b", "tiny-qwen3-vl-moe"}
    for row in rows:
        assert {"name", "family", "hf_repo", "modelscope_repo", "params", "size_bytes",
                "tie_word_embeddings", "refused"} <= set(row)
    # listed and refused: the FP8 releases, and only they
    refused = {r["name"] for r in rows if r["refused"]}
    assert refused == {r["name"] for r in rows if (r["hf_repo"] or "").lower().endswith("-fp8")}
    assert {"qwen3-vl-30b-a3b-fp8", "qwen3-vl-235b-a22b-thinking-fp8", "qwen3.5-27b-fp8"} <= refused


def test_models_table() -> None:
    result = run_vlhub("models")
    assert result.returncode == 0 and "Qwen/Qwen2.5-VL-72B-Instruct" in result.stdout


@pytest.mark.parametrize(
    ("name", "family", "layout", "fmt", "tensors", "tied"),
    [("tiny-qwen2-vl", "qwen2_vl", "official", "safetensors", 58, False),
     ("tiny-qwen2.5-vl", "qwen2_5_vl", "official", "safetensors", 56, True),
     ("tiny-qwen-vl", "qwen_vl", "official", "torch", 61, False)],
)
def test_inspect_tiny_models(name: str, family: str, layout: str, fmt: str, tensors: int, tied: bool) -> None:
    result = run_vlhub("inspect", name, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["family"], report["layout"], report["format"]) == (family, layout, fmt)
    assert report["num_tensors"] == tensors and report["tie_word_embeddings"] is tied
    assert report["dtypes"] == {"bfloat16": tensors}
    assert report["total_bytes"] == 2 * report["num_params"] and len(report["shards"]) >= 2


def test_inspect_lists_tensors(tiny_qwen2_vl: Path) -> None:
    result = run_vlhub("inspect", str(tiny_qwen2_vl / "model.safetensors.index.json"), "--tensors", "--json")
    rows = json.loads(result.stdout)["tensors"]
    embed = next(r for r in rows if r["name"] == "model.embed_tokens.weight")
    assert embed["shape"] == [151936, 128] and embed["dtype"] == "bfloat16" and embed["shard"].startswith("model-")
    table = run_vlhub("inspect", "tiny-qwen2-vl", "--tensors")
    assert "visual.merger.mlp.2.weight" in table.stdout and "128x256" in table.stdout


def test_unknown_model_suggests_close_names() -> None:
    line = one_line_error(run_vlhub_subprocess("inspect", "qwen2-vl-8b"))
    assert "qwen2-vl-7b" in line and "vlhub models" in line


def test_missing_path(tmp_path: Path) -> None:
    line = one_line_error(run_vlhub_subprocess("inspect", str(tmp_path / "x.safetensors")))
    assert "no such file or directory" in line


def test_corrupt_file_is_one_line_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{oops")
    assert "larger than the file" in one_line_error(run_vlhub_subprocess("inspect", str(bad)))
    debug = run_vlhub_subprocess("inspect", str(bad), env={"VLHUB_DEBUG": "1"})
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_usage_error_exits_2() -> None:
    assert run_vlhub_subprocess("inspect").returncode == 2
    assert run_vlhub_subprocess("inspect", "tiny-qwen2-vl", "--no-such-flag").returncode == 2


def test_import_and_help_load_neither_paddle_nor_torch() -> None:
    code = (
        "import sys, vlhub, vlhub.formats.readers, vlhub.inspect\n"
        "from vlhub.cli.app import app\n"
        "from typer.testing import CliRunner\n"
        "assert CliRunner().invoke(app, ['--help']).exit_code == 0\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'paddle', 'torch', 'transformers'})\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
