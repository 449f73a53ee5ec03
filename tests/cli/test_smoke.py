"""`vlhub smoke` passes good conversions and fails every broken one.

Each broken checkpoint is a good conversion of a tiny model with one realistic mistake, written in
the same layout, dtype and format, so only the numbers can give it away.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import BREAKAGES, layers_swapped, rewrite, run_vlhub
from vlhub.manifest import MANIFEST
from vlhub.smoke.run import run_smoke
from vlhub.smoke.verdict import TOLERANCES
from vlhub.targets import prepare_conversion, smoke_runner

TINY = ("tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen-vl")
TARGETS = ("paddle", "safetensors")


@pytest.fixture(scope="module")
def conversions(module_tmp: Callable[[str], Path], tiny_qwen2_vl: Path, tiny_qwen2_5_vl: Path,
                tiny_qwen_vl: Path) -> dict[tuple[str, str], Path]:
    root = module_tmp("smoke")
    out = {}
    for model in TINY:
        for target in TARGETS:
            out[model, target] = prepare_conversion(model, to=target).write(root / f"{model}-{target}").out
    return out


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("model", TINY)
def test_good_conversions_pass(conversions: dict, model: str, target: str) -> None:
    report = run_smoke(smoke_runner(conversions[model, target]))
    assert report.passed, report.as_dict()
    assert report.precision == "exact"
    assert report.tokens_out == report.tokens_ref and len(report.tokens_ref) == 4
    assert report.figure("relative") < 1e-5
    assert report.runtime == ("paddle" if target == "paddle" else "reference")


@pytest.mark.parametrize("breakage", [*BREAKAGES, "bf16 bits read as float16 numbers"])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("model", TINY)
def test_every_broken_conversion_fails(conversions: dict, tmp_path: Path, model: str, target: str,
                                       breakage: str) -> None:
    good = conversions[model, target]
    if breakage == "lm_head replaced by the embedding" and model == "tiny-qwen2.5-vl":
        pytest.skip("tied embeddings: this model has no lm_head of its own")
    if breakage in BREAKAGES:
        broken = rewrite(good, tmp_path / "broken", BREAKAGES[breakage])
    else:
        broken = rewrite(good, tmp_path / "broken", lambda t: t, bits_as_float16=True)
    report = run_smoke(smoke_runner(broken))
    assert not report.passed, f"{breakage} passed: {report.as_dict()}"


def test_a_rewrite_without_a_breakage_still_passes(conversions: dict, tmp_path: Path) -> None:
    """The breakage tests fail because of the breakage, not because of how they rewrite."""
    for target in TARGETS:
        copy = rewrite(conversions["tiny-qwen2-vl", target], tmp_path / target, lambda t: t)
        assert run_smoke(smoke_runner(copy)).passed


def test_cli_reports_json_and_exit_codes(conversions: dict, tmp_path: Path) -> None:
    good = conversions["tiny-qwen2-vl", "paddle"]
    ok = run_vlhub("smoke", str(good), "--json")
    assert ok.returncode == 0, ok.stderr
    verdict = json.loads(ok.stdout)
    assert verdict["passed"] is True
    for key in ("max_abs_diff", "cosine", "top1_agreement", "tokens_ref", "tokens_out"):
        assert key in verdict
    broken = rewrite(good, tmp_path / "broken", layers_swapped)
    failed = run_vlhub("smoke", str(broken), "--against", "tiny-qwen2-vl")
    assert failed.returncode == 1
    assert "FAIL" in failed.stdout and failed.stderr.splitlines()[-1].startswith("error: smoke test failed")
    assert "Traceback" not in failed.stderr


def test_smoke_needs_a_reference(tmp_path: Path, tiny_qwen2_vl: Path, conversions: dict) -> None:
    orphan = tmp_path / "orphan"
    shutil.copytree(conversions["tiny-qwen2-vl", "safetensors"], orphan)
    (orphan / MANIFEST).unlink()
    result = run_vlhub("smoke", str(orphan))
    assert result.returncode == 2 and "--against" in result.stderr
    other = run_vlhub("smoke", str(orphan), "--against", "tiny-qwen-vl")
    assert other.returncode == 2 and "not the same architecture" in other.stderr


def test_streamed_and_resident_agree(conversions: dict) -> None:
    for target in TARGETS:
        streamed = run_smoke(smoke_runner(conversions["tiny-qwen2.5-vl", target]), streamed=True)
        resident = run_smoke(smoke_runner(conversions["tiny-qwen2.5-vl", target]), streamed=False)
        assert streamed.streamed and not resident.streamed
        assert streamed.passed and resident.passed
        assert streamed.tokens_out == resident.tokens_out


def test_convert_runs_the_smoke_test_and_records_it(tmp_path: Path, tiny_qwen_vl: Path) -> None:
    result = run_vlhub("convert", "tiny-qwen-vl", "--to", "paddle", "--out", str(tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["smoke"]["passed"] is True
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["smoke"]["passed"] is True
    skipped = run_vlhub("convert", "tiny-qwen-vl", "--to", "paddle", "--out", str(tmp_path / "quick"), "--no-smoke")
    assert skipped.returncode == 0
    assert json.loads((tmp_path / "quick" / MANIFEST).read_text())["smoke"] == {"passed": None, "state": "skipped"}


def test_a_failed_smoke_fails_the_conversion(tmp_path: Path, tiny_qwen2_vl: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A converter bug (here injected: square matrices left untransposed) exits 1 and is recorded."""
    from typer.testing import CliRunner

    from vlhub.cli.app import app
    from vlhub.convert import pipeline

    real = pipeline.transpose_last

    def square_left_alone(array: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if array.shape[-2] != array.shape[-1]:
            return real(array, out)
        out[:] = array
        return out

    monkeypatch.setattr(pipeline, "transpose_last", square_left_alone)
    result = CliRunner().invoke(app, ["convert", "tiny-qwen2-vl", "--to", "paddle", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "fails its smoke test" in result.output
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["smoke"]["passed"] is False


def test_narrowing_casts_pass_within_their_stated_tolerance(tmp_path: Path, tiny_qwen2_vl: Path) -> None:
    from vlhub.catalog import get_model
    from vlhub.hub.synthetic import write_synthetic_checkpoint

    spec = get_model("tiny-qwen2-vl")
    float32_source = write_synthetic_checkpoint(tmp_path / "f32", spec.family, spec.config, dtype="float32",
                                                format="safetensors")
    for dtype in ("float16", "bfloat16"):
        out = prepare_conversion(str(float32_source), to="paddle", dtype=dtype).write(tmp_path / dtype).out
        report = run_smoke(smoke_runner(out))
        assert report.precision == dtype
        assert report.passed, report.as_dict()
        # the rounding is real: more than float32 noise, well inside the stated bound
        assert 1e-5 < report.figure("relative") < TOLERANCES[dtype].relative / 2
    exact = prepare_conversion(str(float32_source), to="safetensors").write(tmp_path / "same").out
    assert run_smoke(smoke_runner(exact)).precision == "exact"
