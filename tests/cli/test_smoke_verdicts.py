"""The smoke test's input comes from the checkpoint, and its verdict is recorded whatever happens to it (the
prompt's ids and the tokenizer files: tests/unit/test_smoke_inputs.py).

A conversion whose smoke test is refused, crashes, is interrupted or is killed must not look like one made
with --no-smoke: the manifest says what happened and `vlhub check` reports it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.helpers import run_vlhub
from vlhub.cli import convert as convert_cli
from vlhub.cli.app import app
from vlhub.errors import UserError
from vlhub.manifest import MANIFEST


def verdict(out: Path) -> dict:
    """The smoke verdict the manifest records (empty in the moment between the output and its first verdict)."""
    return json.loads((out / MANIFEST).read_text()).get("smoke") or {}


def check_smoke_line(out: Path) -> dict:
    result = run_vlhub("check", str(out), "--json")
    return next(c for c in json.loads(result.stdout)["checks"] if c["group"] == "smoke")


def with_config(source: Path, destination: Path, **changes: object) -> Path:
    shutil.copytree(source, destination)
    config = json.loads((destination / "config.json").read_text())
    config.update(changes)
    (destination / "config.json").write_text(json.dumps(config))
    return destination


@pytest.mark.parametrize(("changes", "message"), [
    ({"image_token_id": 151936}, "config.json image_token_id is 151936, outside the 151936-token vocabulary"),
    ({"vision_start_token_id": None}, "config.json vision_start_token_id is missing"),
    ({"vision_end_token_id": 151655}, "they must differ"),
])
def test_a_prompt_the_checkpoint_cannot_take_is_refused_before_converting(
        tiny_qwen2_vl: Path, tmp_path: Path, changes: dict, message: str) -> None:
    source = with_config(tiny_qwen2_vl, tmp_path / "source", **changes)
    for target in ("paddle", "vamc"):
        result = run_vlhub("convert", str(source), "--to", target, "--out", str(tmp_path / target))
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / target).exists()
    unsmoked = run_vlhub("convert", str(source), "--to", "paddle", "--out", str(tmp_path / "p"), "--no-smoke")
    assert unsmoked.returncode == 0
    assert verdict(tmp_path / "p")["state"] == "skipped"
    assert check_smoke_line(tmp_path / "p")["detail"] == "not run: converted with --no-smoke"


@pytest.mark.parametrize(("raised", "state", "exit_code"), [
    (KeyboardInterrupt(), "interrupted", 130),
    (UserError("no room for the reference"), "errored", 2),
    (RuntimeError("a vlhub bug"), "errored", 1),
])
def test_a_smoke_test_that_stops_is_recorded(tiny_qwen2_vl: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             raised: BaseException, state: str, exit_code: int) -> None:
    def stop(*args: object, **kwargs: object) -> None:
        raise raised

    monkeypatch.setattr(convert_cli, "run_smoke", stop)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["convert", str(tiny_qwen2_vl), "--to", "paddle", "--out", str(out)])
    assert result.exit_code == exit_code
    recorded = verdict(out)
    assert recorded["passed"] is None and recorded["state"] == state
    if state == "errored":
        assert str(raised) in recorded["reason"]
    line = check_smoke_line(out)
    assert line["status"] == "warn" and line["detail"].startswith(
        {"interrupted": "interrupted before it finished", "errored": "stopped on an error: "}[state])


def test_a_killed_smoke_test_is_reported_as_unfinished(tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "vlhub", "convert", str(tiny_qwen2_vl), "--to", "paddle",
                                "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if (out / MANIFEST).exists() and (verdict(out) or {}).get("state") == "running":
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the smoke test ended before it could be killed"
    line = check_smoke_line(out)
    assert line["status"] == "warn" and line["detail"] == "started and never finished (the run was killed)"
    # the same conversion from the cache runs the unfinished smoke test again
    assert run_vlhub("smoke", str(out)).returncode == 0


def test_a_tpu_mlir_smoke_says_what_did_not_run(tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    out = tmp_path / "tpu"
    result = run_vlhub("convert", str(tiny_qwen2_vl), "--to", "tpu-mlir", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "not run here: simulator" in result.stdout and "(3 stages ran, 1 not run here)" in result.stdout
    skipped = verdict(out)["skipped"]
    assert [s["name"] for s in skipped] == ["simulator"] and "no toolchain" in skipped[0]["detail"]


def test_smoke_takes_a_model_name(tmp_path: Path) -> None:
    home = {"VLHUB_HOME": str(tmp_path / "home")}  # a cache of its own: other tests convert tiny models too

    def vlhub(*args: str) -> subprocess.CompletedProcess[str]:
        return run_vlhub(*args, env=home)

    assert "no conversion of tiny-qwen2.5-vl in the cache" in vlhub("smoke", "tiny-qwen2.5-vl").stderr
    assert vlhub("convert", "tiny-qwen2.5-vl", "--to", "paddle", "--no-smoke").returncode == 0
    assert vlhub("smoke", "tiny-qwen2.5-vl").returncode == 0
    assert vlhub("convert", "tiny-qwen2.5-vl", "--to", "safetensors", "--no-smoke").returncode == 0
    several = vlhub("smoke", "tiny-qwen2.5-vl")
    assert several.returncode == 2 and "paddle, safetensors: pass --target" in several.stderr
    assert vlhub("smoke", "tiny-qwen2.5-vl", "--target", "safetensors").returncode == 0
