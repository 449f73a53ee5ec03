"""The simulator stage of a tpu-mlir layout's smoke test: the toolchain check, the inputs the cmodel runner gets, the
verdict, and (marked `toolchain`, skipped unless VLHUB_TPU_MLIR_PYTHON names one) the real run: llm_convert, then
the bmodel's first token on the bm1684x cmodel against the reference's."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import run_vlhub
from vlhub.catalog import get_model
from vlhub.errors import UserError
from vlhub.smoke.inputs import DEVICE_MASKED, smoke_input
from vlhub.smoke.run import run_smoke
from vlhub.targets import smoke_runner
from vlhub.targets.tpu_mlir.cmodel_runner import from_bf16, to_bf16
from vlhub.targets.tpu_mlir.simulator import (
    TOOLCHAIN_ENV,
    SimulatorResult,
    ensure_bmodel,
    resolve_toolchain,
    simulator_inputs,
)

SIMULATED = ["--seq-length", "128", "--max-pixels", "168x112", "--quantize", "bf16"]  # the smoke image: 96 patches


def convert(model: str, out: Path) -> Path:
    result = run_vlhub("convert", model, "--to", "tpu-mlir", "--out", str(out), *SIMULATED, "--no-smoke")
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.toolchain
@pytest.mark.skipif(not os.environ.get(TOOLCHAIN_ENV), reason=f"{TOOLCHAIN_ENV} names no TPU-MLIR toolchain")
def test_the_bmodel_chooses_the_reference_first_token_on_the_cmodel(tmp_path: Path) -> None:
    out = convert("tiny-qwen2-vl", tmp_path / "out")
    report = run_smoke(smoke_runner(out, {"tpu_mlir_python": os.environ[TOOLCHAIN_ENV]}), tokens=1)
    stage = report.stages[-1]
    assert stage.name == "simulator" and stage.passed, stage.detail
    assert stage.detail.startswith(f"bm1684x cmodel token {report.tokens_ref[0]}, reference {report.tokens_ref[0]},")
    assert stage.cosine is not None and stage.cosine > 0.999  # float32 logits from the cmodel's last hidden state
    assert report.passed and list((out / "compiled").glob("*.bmodel"))


def test_no_toolchain_named_means_no_simulator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOOLCHAIN_ENV, raising=False)
    assert resolve_toolchain(None) is None


def test_a_missing_interpreter_is_refused_naming_where_it_came_from(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"--tpu-mlir-python .*/nope: no such interpreter; point it at the python3\.10"):
        resolve_toolchain(str(tmp_path / "nope"))
    monkeypatch.setenv(TOOLCHAIN_ENV, str(tmp_path / "nope"))
    with pytest.raises(UserError, match=f"{TOOLCHAIN_ENV} .*: no such interpreter"):
        resolve_toolchain(None)


@pytest.mark.skipif(sys.version_info[:2] == (3, 10), reason="this interpreter is the wheel's version")
def test_a_python_other_than_3_10_is_refused() -> None:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    with pytest.raises(UserError, match=rf"is Python {version}; the tpu-mlir wheel installs on Python 3\.10 only"):
        resolve_toolchain(sys.executable)


@pytest.mark.skipif(shutil.which("true") is None, reason="no `true` command")
def test_a_program_that_is_not_python_is_refused() -> None:
    with pytest.raises(UserError, match="is not a Python interpreter"):
        resolve_toolchain(shutil.which("true"))


def test_the_option_belongs_to_tpu_mlir_layouts_and_is_checked_before_the_reference(tmp_path: Path,
                                                                                   tiny_qwen2_vl: Path) -> None:
    other = run_vlhub("smoke", str(tiny_qwen2_vl), "--tpu-mlir-python", sys.executable)
    assert other.returncode == 2 and "is not one" in other.stderr
    out = convert("tiny-qwen2-vl", tmp_path / "out")
    missing = run_vlhub("smoke", str(out), "--tpu-mlir-python", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "no such interpreter" in missing.stderr


def test_a_failed_compile_is_one_line_saying_what_to_do(tmp_path: Path) -> None:
    script = tmp_path / "compile.sh"
    script.write_text('echo "llm_convert output"\necho "error: GNU parallel is not on PATH (llm_convert runs its jobs '
                      'with it): apt-get install parallel" >&2\nexit 2\n')
    with pytest.raises(UserError, match=r"^compile\.sh failed: GNU parallel is not on PATH .*apt-get install "
                                        r"parallel \(its output: .*compile\.log\)$"):
        ensure_bmodel(tmp_path, sys.executable)


@pytest.mark.parametrize(("model", "patches"), [("tiny-qwen2-vl", 96), ("tiny-qwen2-vl", 144),
                                                ("tiny-qwen2.5-vl", 144)])
def test_inputs_are_padded_to_the_networks_shapes(model: str, patches: int) -> None:
    config = get_model(model).config
    smoke = smoke_input(config)
    inputs = simulator_inputs(smoke, config, 128, patches)
    count, length = len(smoke.vision.pixel_values), len(smoke.input_ids)
    assert inputs["vit.input_states"].shape == (patches, 1176) and inputs["vit.input_states"].dtype == np.float32
    assert inputs["vit.position_ids"].shape == (patches, 2) and inputs["vit.position_ids"].dtype == np.int32
    full = inputs["vit.full_attn_mask"][0, 0]
    assert full.shape == (patches, patches) and not full[:count, :count].any()
    assert (full[:count, count:] == DEVICE_MASKED).all() and not full[count:, count:].any()
    assert inputs["input_ids"].shape == (1, 128) and (inputs["input_ids"][0, :length] == smoke.input_ids).all()
    assert not inputs["input_ids"][0, length:].any() and inputs["position_ids"].shape == (3, 128)
    mask = inputs["attention_mask"][0, 0]
    assert mask[length - 1, :length].max() == 0 and mask[0, 1] == DEVICE_MASKED and (mask[length:] == DEVICE_MASKED).all()
    assert list(inputs["image_rows"]) == list(np.flatnonzero(smoke.image_mask)) and inputs["last"] == length - 1
    if model == "tiny-qwen2.5-vl":
        assert list(inputs["vit.reverse_index"][:count // 4]) == list(smoke.vision.reverse_index)
        assert len(inputs["vit.reverse_index"]) == patches // 4 and inputs["vit.window_attn_mask"].shape[-1] == patches
    else:
        assert (inputs["vit.input_states"][:count] == smoke.vision.pixel_values).all()


def test_an_image_the_vit_cannot_hold_is_refused() -> None:
    config = get_model("tiny-qwen2-vl").config
    with pytest.raises(UserError, match="the smoke image is 96 patches and this bmodel's ViT takes 64: convert with"):
        simulator_inputs(smoke_input(config), config, 128, 64)


def result(token: int, host: int, margin: float) -> SimulatorResult:
    reference = np.zeros(16, dtype=np.float32)
    reference[3], reference[5] = 4.5, 4.5 - margin
    host_logits = reference.copy()
    host_logits[host] += 0.01
    return SimulatorResult("bm1684x", token, 3, host, host_logits, reference, 0.9999, {"cmodel": 90.0})


def test_the_token_must_equal_the_reference_and_a_near_tie_is_explained_not_passed() -> None:
    assert result(3, 3, 0.2).stage().passed
    tie = result(5, 3, 0.018).stage()
    assert not tie.passed and tie.top1_agreement == 0.0
    assert "a near tie: the reference ranks 5 0.018 below 3, against bf16's step of 0.0312" in tie.detail
    wrong = result(5, 5, 0.2).stage()
    assert not wrong.passed and "near tie" not in wrong.detail


def test_bf16_bits_round_to_nearest_even() -> None:
    values = np.array([1.0, -2.5, 3.14159, 65504.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8], dtype=np.float32)
    assert list(from_bf16(to_bf16(values))) == [1.0, -2.5, 3.140625, 65536.0, 1.0, 1 + 2 ** -6]
