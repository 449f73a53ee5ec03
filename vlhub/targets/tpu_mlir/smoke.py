"""The smoke test of a TPU-MLIR layout: model/ (the weights llm_convert reads) in the numpy reference, or, exported
with --onnx, the ONNX networks under onnxruntime; and, when a toolchain is named, the bmodel's first token on the
cmodel simulator (minutes), which must be the reference's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlhub.deploy.target import flag
from vlhub.errors import CheckFailed
from vlhub.manifest import TargetRecord
from vlhub.smoke.run import Outputs, Reference, Run, RuntimeMissing, Status, checkpoint_outputs, compare_runs
from vlhub.smoke.verdict import SmokeReport, Stage
from vlhub.targets.tpu_mlir.simulator import STAGE, TOOLCHAIN_ENV, check_fits, simulate_first_token

ONNX_NETWORKS = "models/onnx"  # where `vlhub convert --to tpu-mlir --onnx` puts its networks


@dataclass(frozen=True)
class TpuSmokeOptions:
    """The smoke test's own flags."""

    tpu_mlir_python: str | None = flag(
        "The Python 3.10 with the tpu-mlir wheel: compile the bmodel if need be and run its first token on the cmodel "
        f"simulator (minutes; default: ${TOOLCHAIN_ENV}, else no simulator stage).", metavar="PATH")


@dataclass
class TpuMlirRunner:
    """The layout at `layout`, its weight folder `artifact`, what its manifest records, and the toolchain's Python
    (None: no simulator stage)."""

    artifact: Path
    layout: Path
    record: TargetRecord
    toolchain: str | None

    def run(self, reference: Path, tokens: int, streamed: bool | None, say: Status) -> SmokeReport:
        source = Reference.probe(reference, streamed)
        onnx = (self.layout / ONNX_NETWORKS).is_dir()  # exported with --onnx: its networks are what runs
        # model/'s weights run in vlhub's numpy forward: named so, as "reference" would read as if model/ were the
        # side it is held to (the source checkpoint)
        report = (source.report(self.layout, weights=self.artifact, runtime="onnxruntime") if onnx
                  else source.report(self.artifact, runtime="numpy"))
        if report.stages:  # the weights do not load
            return report
        if self.toolchain:  # before the reference runs
            check_fits(source.smoke, self.record.details["seq_length"], self.record.details["vision_patches"],
                       source.config)

        def runs(expected: Outputs) -> list[Run]:
            if onnx:
                return [("", lambda: _onnx_outputs(self.layout, source, expected.tokens, say))]
            return [("", lambda: checkpoint_outputs(self.artifact, report.runtime, source.smoke, expected.tokens,
                                                    source.resident, say))]

        expected = compare_runs(source, report, tokens, say, runs)
        if self.toolchain:
            report.stages.append(_simulator_stage(self.layout, self.toolchain, source, expected, say))
        else:  # the weights were proved; the bmodel was not
            report.skipped.append(Stage(STAGE, False, detail=(
                f"the bmodel on TPU-MLIR's cmodel: no toolchain named (--tpu-mlir-python PATH or {TOOLCHAIN_ENV})")))
        return report


def _onnx_outputs(layout: Path, source: Reference, reference_tokens: list[int], say: Status) -> Outputs:
    """The exported ONNX networks under onnxruntime: vision, prefill, then decode steps with the KV history
    held sequence-major as the TPU runtime holds it (teacher-forced with the reference's tokens)."""
    try:
        from vlhub.targets.tpu_mlir.onnx_runtime import onnx_outputs
    except ImportError as exc:
        raise RuntimeMissing(f"running the ONNX networks needs onnx and onnxruntime ({exc}); "
                             "install them with: pip install 'vlhub[onnx]'") from None
    say("onnxruntime: vision transformer, prefill and decode steps")
    return Outputs(*onnx_outputs(layout, source.config, source.smoke, reference_tokens, resident=source.resident))


def _simulator_stage(layout: Path, python: str, source: Reference, expected: Outputs, say: Status) -> Stage:
    """The TPU-MLIR layout's bmodel on the cmodel: its first token against the reference's."""
    assert expected.token_logits is not None
    try:
        result = simulate_first_token(layout, python, source.smoke, expected.token_logits[0], expected.image_embeds,
                                      status=say)
    except CheckFailed as exc:  # it did not run to a token
        return Stage(STAGE, False, detail=str(exc))
    return result.stage()
