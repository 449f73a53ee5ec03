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

from tests.conftest import run_vlhub
from vlhub.formats.registry import format_of_file
from vlhub.formats.tensors import TensorMeta
from vlhub.formats.writers import CheckpointWriter
from vlhub.hub.synthetic import cast_float32
from vlhub.manifest import MANIFEST
from vlhub.smoke.run import run_smoke
from vlhub.smoke.verdict import TOLERANCES
from vlhub.smoke.weights import ModelWeights
from vlhub.targets import prepare_conversion, smoke_runner

TINY = ("tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen-vl")
TARGETS = ("paddle", "safetensors")

Tensors = dict[str, np.ndarray]  # official name -> float32, torch orientation


def rewrite(good: Path, out: Path, edit: Callable[[Tensors], Tensors], *, bits_as_float16: bool = False) -> Path:
    """A copy of the checkpoint at `good` (same layout, dtypes, format and files) with `edit` applied to
    its tensors, taken by official name. `bits_as_float16` stores bf16 tensors as float16 numbers equal to
    their bit patterns: the uint16 trap (docs/facts/paddle.md#uint16-trap)."""
    with ModelWeights.open(good, resident=True) as weights:
        tensors = edit({step.target.name: weights.get(step.target.name).copy() for step in weights.plan.steps})
        steps = weights.plan.steps
        fmt = weights.checkpoint.format
        raw = {step.source.name: weights.checkpoint.read(step.source.name) for step in steps}
    out.mkdir()
    metas = []
    for step in steps:
        dtype = "float16" if bits_as_float16 and step.source.dtype == "bfloat16" else step.source.dtype
        metas.append(TensorMeta(step.source.name, dtype, step.source.shape))
    with CheckpointWriter(out, fmt, metas) as writer:
        for step, meta in zip(steps, metas):
            if meta.dtype != step.source.dtype:
                writer.write(meta.name, raw[meta.name].astype(np.float16))
                continue
            values = tensors[step.target.name]
            writer.write(meta.name, cast_float32(values.T.copy() if step.transpose else values, meta.dtype))
    for extra in good.iterdir():
        if format_of_file(extra.name) is None and not extra.name.endswith(".index.json"):
            shutil.copy2(extra, out / extra.name)
    return out


def layer_prefix(tensors: Tensors) -> str:
    """Where decoder layers' names start, for the family these tensors belong to."""
    return "model.layers." if "model.norm.weight" in tensors else "transformer.h."


def untransposed_square(tensors: Tensors) -> Tensors:
    prefix = layer_prefix(tensors)
    name = prefix + ("0.attn.c_proj.weight" if prefix.startswith("transformer") else "0.self_attn.o_proj.weight")
    assert tensors[name].shape[0] == tensors[name].shape[1]
    tensors[name] = tensors[name].T.copy()
    return tensors


def q_and_k_swapped(tensors: Tensors) -> Tensors:
    prefix = layer_prefix(tensors)
    if prefix.startswith("transformer"):  # fused [q; k; v] rows
        fused = tensors[prefix + "1.attn.c_attn.weight"]
        third = fused.shape[0] // 3
        fused[:third], fused[third:2 * third] = fused[third:2 * third].copy(), fused[:third].copy()
        return tensors
    q, k = (tensors[f"{prefix}1.self_attn.{p}_proj.weight"] for p in "qk")
    # grouped-query attention: k has fewer rows than q; swap k with the q heads of its size
    q[: len(k)], k[:] = k.copy(), q[: len(k)].copy()
    return tensors


def layers_swapped(tensors: Tensors) -> Tensors:
    prefix = layer_prefix(tensors)
    first = {n: v for n, v in tensors.items() if n.startswith(prefix + "0.")}
    for name in first:
        other = prefix + "1." + name[len(prefix) + 2:]
        tensors[name], tensors[other] = tensors[other], tensors[name]
    return tensors


def merger_zeroed(tensors: Tensors) -> Tensors:
    merger = "visual.merger." if "visual.merger.ln_q.weight" in tensors else "transformer.visual.attn_pool."
    for name in tensors:
        if name.startswith(merger) and name.endswith("weight") and tensors[name].ndim == 2:
            tensors[name][:] = 0
    return tensors


def lm_head_is_embedding(tensors: Tensors) -> Tensors:
    embedding = "transformer.wte.weight" if "transformer.wte.weight" in tensors else "model.embed_tokens.weight"
    tensors["lm_head.weight"] = tensors[embedding].copy()
    return tensors


BREAKAGES: dict[str, Callable[[Tensors], Tensors]] = {
    "square Linear weight left untransposed": untransposed_square,
    "q_proj and k_proj swapped": q_and_k_swapped,
    "decoder layers 0 and 1 swapped": layers_swapped,
    "vision merger zeroed": merger_zeroed,
    "lm_head replaced by the embedding": lm_head_is_embedding,
}


@pytest.fixture(scope="module")
def conversions(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2_vl: Path, tiny_qwen2_5_vl: Path,
                tiny_qwen_vl: Path) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("smoke")
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
    assert "FAIL" in failed.stdout and failed.stderr.startswith("error: smoke test failed")
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

    real = pipeline.transpose_2d

    def square_left_alone(array: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if array.shape[0] != array.shape[1]:
            return real(array, out)
        out[:] = array
        return out

    monkeypatch.setattr(pipeline, "transpose_2d", square_left_alone)
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
