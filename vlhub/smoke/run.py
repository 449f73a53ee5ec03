"""`vlhub smoke`: run a converted checkpoint in its runtime and compare it with the reference on the source.

    report = run_smoke(Path("Qwen2-VL-7B-Instruct-paddle"))          # source from the manifest
    report = run_smoke(out_dir, against="tiny-qwen2-vl", tokens=4)
    report.passed, report.as_dict()

The reference (numpy, float32) runs on the source: vision tower, prefill, greedy decoding of `tokens`
tokens. The artifact runs in its runtime (Paddle for Paddle layouts, the reference itself for
Hugging Face layouts) on the same input, teacher-forced with the reference's tokens, so a single
pass gives its prefill logits and its choice at every generated position. Models too large to hold
comfortably in float32 are streamed: one layer's weights at a time on both sides.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vlhub.convert.configs import official_config
from vlhub.convert.conversion import MANIFEST
from vlhub.convert.plan import KeyMapMismatch
from vlhub.errors import CheckFailed, CorruptCheckpoint, UserError
from vlhub.formats.writers import write_json_atomic
from vlhub.hub.sources import resolve_source
from vlhub.hub.store import layout_target
from vlhub.smoke.inputs import SmokeInput, smoke_input, tokenizer_special_tokens
from vlhub.smoke.reference import ReferenceForward
from vlhub.smoke.verdict import (
    TOLERANCES,
    SmokeReport,
    Stage,
    Tolerance,
    compare_arrays,
    compare_tokens,
    precision_class,
)
from vlhub.smoke.weights import ModelWeights
from vlhub.targets.tpu_mlir.simulator import STAGE as SIMULATOR_STAGE
from vlhub.targets.tpu_mlir.simulator import (
    TOOLCHAIN_ENV,
    check_fits,
    resolve_toolchain,
    simulate_first_token,
    tpu_mlir_target,
)

if TYPE_CHECKING:  # paddle is imported only when a Paddle checkpoint is run
    from vlhub.smoke.paddle_forward import PaddleForward
    from vlhub.targets.paddle_inference.static import StaticPredictor

DEFAULT_TOKENS = 4
# a forward keeps its weights in memory (as float32) only when they take at most this share of the
# memory available now: the two sides run one after the other, and activations need room too
_RESIDENT_SHARE = 0.25
# the dims two checkpoints must share for one to be compared with the other
_ARCHITECTURE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")

Status = Callable[[str], None]


class RuntimeMissing(UserError):
    """The artifact's runtime is not installed here, so the smoke test cannot run."""


@dataclass
class _Outputs:
    image_embeds: np.ndarray
    prompt_logits: np.ndarray
    tokens: list[int]
    token_logits: np.ndarray | None = None  # the reference's: [tokens, vocab], what each token was chosen from


def run_smoke(
    artifact: Path | str,
    *,
    against: str | None = None,
    tokens: int = DEFAULT_TOKENS,
    streamed: bool | None = None,
    status: Status | None = None,
    tpu_mlir_python: str | None = None,
) -> SmokeReport:
    """Smoke-test the checkpoint at `artifact` against `against` (default: the source its manifest names).

    `streamed` None decides from the model's size and the memory available. Raises UserError when
    the test cannot run (no reference, different architectures, no Paddle); a broken artifact is a
    failed report, not an error. A TPU-MLIR layout, when a toolchain is named (`tpu_mlir_python`, else
    $VLHUB_TPU_MLIR_PYTHON), also gets a "simulator" stage: its bmodel's first token on the cmodel
    (vlhub.targets.tpu_mlir.simulator; minutes).
    """
    if tokens < 1:
        raise UserError("--tokens must be at least 1")
    say = status or (lambda _message: None)
    layout = Path(artifact)
    target = tpu_mlir_target(layout)
    if tpu_mlir_python and target is None:
        raise UserError(f"--tpu-mlir-python runs the bmodel of a vlhub convert --to tpu-mlir layout; {layout} is "
                        "not one")
    toolchain = resolve_toolchain(tpu_mlir_python) if target else None
    artifact = _weights_of_layout(layout)
    if not artifact.exists():
        raise UserError(f"no such file or directory: {artifact}")
    reference_path = resolve_source(against) if against else _recorded_source(artifact)
    if layout_target(layout, "vamc") is not None:
        return _vamc_smoke(layout, reference_path, say)
    started = time.monotonic()
    with ModelWeights.open(reference_path) as probe:
        family, config = probe.family, probe.config
        smoke = checkpoint_smoke_input(probe.checkpoint.root, config)
        resident = not (streamed if streamed is not None else _too_large(probe.float32_bytes))
        source_dtypes = {step.target.name: step.source.dtype for step in probe.plan.steps}
    runtime, artifact_dtypes, load_error = _inspect_artifact(artifact, family, config)
    if (layout / ONNX_NETWORKS).is_dir():  # a TPU-MLIR layout exported with --onnx: its networks are what runs
        runtime, artifact = "onnxruntime", layout
    report = SmokeReport(str(artifact), str(reference_path), runtime, not resident,
                         precision_class([(source_dtypes[n], d) for n, d in artifact_dtypes.items()
                                          if n in source_dtypes]))
    if load_error:
        report.stages.append(Stage("load", False, detail=load_error))
        report.seconds = time.monotonic() - started
        return report
    if toolchain and target:  # before the reference runs
        check_fits(smoke, target["seq_length"], target["vision_patches"])
    # broken weights overflow and produce NaN; the comparison reports that, numpy need not warn about it
    with ModelWeights.open(reference_path, resident=resident) as weights, np.errstate(all="ignore"):
        expected = _reference_outputs(ReferenceForward(weights), smoke, tokens, say)
    tolerance = TOLERANCES[report.precision]
    report.tokens_ref = expected.tokens
    for label, produce in _artifact_runs(artifact, runtime, smoke, expected.tokens, resident, say, layout, config):
        try:
            with np.errstate(all="ignore"):
                produced = produce()
        except (CheckFailed, KeyMapMismatch) as exc:  # the artifact's weights do not load into the network
            report.stages.append(Stage(label + "load", False, detail=str(exc)))
            continue
        report.stages += _compare(label, expected, produced, tolerance)
        if not label:
            report.tokens_out = _until_first_difference(expected.tokens, produced.tokens)
    if toolchain:
        report.stages.append(_simulator_stage(layout, toolchain, smoke, expected, say))
    elif target:  # the weights were proved; the bmodel was not
        report.skipped.append(Stage(SIMULATOR_STAGE, False, detail=(
            f"the bmodel on TPU-MLIR's cmodel: no toolchain named (--tpu-mlir-python PATH or {TOOLCHAIN_ENV})")))
    report.seconds = time.monotonic() - started
    return report


def checkpoint_smoke_input(root: Path, config: dict) -> SmokeInput:
    """The smoke input for the checkpoint in `root` (its config.json as read, its tokenizer files' special
    tokens); raises UserError when no prompt can be made for it."""
    return smoke_input(official_config(config), tokenizer=tokenizer_special_tokens(root))


def _simulator_stage(layout: Path, python: str, smoke: SmokeInput, expected: _Outputs, say: Status) -> Stage:
    """The TPU-MLIR layout's bmodel on the cmodel: its first token against the reference's."""
    assert expected.token_logits is not None
    try:
        result = simulate_first_token(layout, python, smoke, expected.token_logits[0], expected.image_embeds,
                                      status=say)
    except CheckFailed as exc:  # it did not run to a token
        return Stage(SIMULATOR_STAGE, False, detail=str(exc))
    return result.stage()


def _compare(label: str, expected: _Outputs, produced: _Outputs, tolerance: Tolerance) -> list[Stage]:
    assert expected.token_logits is not None
    margins = [float(row[a] - row[b]) for row, a, b in zip(expected.token_logits, expected.tokens, produced.tokens)]
    limit = 2 * tolerance.relative * float(np.abs(expected.prompt_logits).max())
    tokens = compare_tokens(expected.tokens, produced.tokens, margins, limit)
    tokens.name = label + tokens.name
    return [
        compare_arrays(label + "vision embeddings", expected.image_embeds, produced.image_embeds, tolerance),
        compare_arrays(label + "prefill logits", expected.prompt_logits, produced.prompt_logits, tolerance, top1=True),
        tokens,
    ]


def _recorded_source(artifact: Path) -> Path:
    manifest_path = (artifact if artifact.is_dir() else artifact.parent) / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        source = manifest["source"]
    except FileNotFoundError:
        raise UserError(f"{artifact} has no {MANIFEST} naming its source; pass --against SRC") from None
    except (ValueError, KeyError, TypeError):
        raise CorruptCheckpoint(f"{manifest_path} is not a vlhub manifest; pass --against SRC") from None
    path = Path(source.get("path") or "")
    if source.get("path") and path.exists():
        return path
    if source.get("model"):  # a catalog model (tiny ones are rebuilt on demand)
        return resolve_source(source["model"])
    raise UserError(f"the source {artifact} was converted from ({source.get('path')}) is gone; pass --against SRC")


ONNX_NETWORKS = "models/onnx"  # where `vlhub convert --to tpu-mlir --onnx` puts its networks


def _weights_of_layout(path: Path) -> Path:
    """A deployment layout whose manifest names the directory its smoke test runs (`target.smoke_path`: the
    TPU-MLIR layout's model/) stands for that directory."""
    smoke_path = (layout_target(path) or {}).get("smoke_path")
    return path / smoke_path if isinstance(smoke_path, str) else path


def _vamc_smoke(layout: Path, reference_path: Path, say: Status) -> SmokeReport:
    """A vamc layout has no runtime here: its own checks stand in (vlhub.targets.vamc.smoke)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise RuntimeMissing(f"the vamc smoke test runs the vision network in onnxruntime, which is not importable "
                             f"({exc}); install it with: pip install 'vlhub[onnx]'") from None
    from vlhub.targets.vamc.smoke import vamc_smoke

    report = vamc_smoke(layout, reference_path, say)
    report.skipped.append(Stage("language model", False, detail="vamc compiles and runs it on VastAI's toolchain "
                                                               "and cards, not here"))
    return report


def _too_large(float32_bytes: int) -> bool:
    return float32_bytes > _RESIDENT_SHARE * available_memory()


def available_memory() -> int:
    """Bytes of memory available to a new allocation now (MemAvailable), or a safe 4 GiB guess."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def _inspect_artifact(artifact: Path, family: str, config: dict) -> tuple[str, dict[str, str], str]:
    """The runtime that runs the artifact, its tensors' dtypes by official name, and why it cannot
    load, if it cannot (a failed smoke, not an error)."""
    layout = inference_weights(artifact)
    try:
        weights = ModelWeights.open(layout or artifact)
    except KeyMapMismatch as exc:
        return "unknown", {}, str(exc)
    with weights:
        if weights.family != family or any(
                weights.config.get(k) != config.get(k) for k in _ARCHITECTURE_KEYS if k in config):
            raise UserError(f"{artifact} is not the same architecture as the reference ({family}, "
                            f"{', '.join(f'{k} {config.get(k)}' for k in _ARCHITECTURE_KEYS if k in config)}); "
                            "pass --against a checkpoint of this model")
        runtime = "paddle" if weights.checkpoint.format.name == "pdparams" else "reference"
        return "paddle-inference" if layout else runtime, {step.target.name: step.source.dtype for step in weights.plan.steps}, ""


def _reference_outputs(forward: ReferenceForward, smoke: SmokeInput, tokens: int, say: Status) -> _Outputs:
    say("reference: vision tower")
    embeds = forward.encode_images(smoke)
    say("reference: prefill and greedy decoding")
    prompt_logits, generated, token_logits = forward.generate(smoke, embeds, tokens, on_token=say)
    return _Outputs(embeds, prompt_logits, generated, token_logits)


def inference_weights(path: Path) -> Path | None:
    """The weights directory of a Paddle Inference layout (`vlhub convert --to paddle-inference`), if
    `path` is one."""
    target = layout_target(path)
    if not (path / "checkpoints").is_dir() or target is None or not isinstance(target.get("weights"), str):
        return None
    return path / target["weights"]


def _artifact_runs(artifact: Path, runtime: str, smoke: SmokeInput, reference_tokens: list[int], resident: bool,
                   say: Status, layout: Path, config: dict) -> list[tuple[str, Callable[[], _Outputs]]]:
    """What runs the artifact, each labelled for its stages: a Paddle Inference layout is its static
    graphs and the weights directory Paddle's loaders read; a TPU-MLIR layout with ONNX networks is those
    networks under onnxruntime; anything else is one checkpoint."""
    if runtime == "onnxruntime":
        return [("", lambda: _onnx_outputs(layout, config, smoke, reference_tokens, resident, say))]
    if runtime != "paddle-inference":
        return [("", lambda: _checkpoint_outputs(artifact, runtime, smoke, reference_tokens, resident, say))]
    weights = inference_weights(artifact)
    assert weights is not None
    return [("", lambda: _static_outputs(artifact, weights, smoke, len(reference_tokens), say)),
            ("weights: ", lambda: _checkpoint_outputs(weights, "paddle", smoke, reference_tokens, resident, say))]


def _onnx_outputs(layout: Path, config: dict, smoke: SmokeInput, reference_tokens: list[int], resident: bool,
                  say: Status) -> _Outputs:
    """The exported ONNX networks under onnxruntime: vision, prefill, then decode steps with the KV history
    held sequence-major as the TPU runtime holds it (teacher-forced with the reference's tokens)."""
    try:
        from vlhub.targets.tpu_mlir.onnx_runtime import onnx_outputs
    except ImportError as exc:
        raise RuntimeMissing(f"running the ONNX networks needs onnx and onnxruntime ({exc}); "
                             "install them with: pip install 'vlhub[onnx]'") from None
    say("onnxruntime: vision transformer, prefill and decode steps")
    return _Outputs(*onnx_outputs(layout, config, smoke, reference_tokens, resident=resident))


def _static_outputs(layout: Path, weights: Path, smoke: SmokeInput, tokens: int, say: Status) -> _Outputs:
    """The static graphs' own greedy generation under paddle.inference."""
    predictor = _static_predictor(layout / "checkpoints", weights)
    try:
        say("paddle inference: vision encoder")
        embeds = predictor.encode_images(smoke.pixel_values, **_vision_kwargs(smoke))
        say("paddle inference: prefill and greedy decoding")
        prompt_logits, generated = predictor.generate(smoke.input_ids, smoke.position_ids, embeds, smoke.image_mask,
                                                      tokens, smoke.positions_after)
    finally:
        predictor.close()
    return _Outputs(embeds, prompt_logits, generated)


def _checkpoint_outputs(path: Path, runtime: str, smoke: SmokeInput, reference_tokens: list[int],
                        resident: bool, say: Status) -> _Outputs:
    """A checkpoint's outputs for the prompt followed by the reference's tokens (teacher forcing)."""
    follow = np.array(reference_tokens[:-1], dtype=np.int64)
    ids = np.concatenate([smoke.input_ids, follow])
    positions = np.concatenate([smoke.position_ids, smoke.positions_after(len(follow))], axis=-1)
    mask = np.concatenate([smoke.image_mask, np.zeros(len(follow), dtype=bool)])
    if runtime == "paddle":
        forward = _paddle_forward(path, resident)
        try:
            say("paddle: vision tower")
            embeds = forward.encode_images(smoke.pixel_values, **_vision_kwargs(smoke))
            say("paddle: prefill (teacher-forced)")
            logits = forward.logits(ids, positions, embeds, mask)
        finally:
            forward.close()
    else:
        with ModelWeights.open(path, resident=resident) as weights:
            reference = ReferenceForward(weights)
            say("artifact: vision tower")
            embeds = reference.encode_images(smoke)
            say("artifact: prefill (teacher-forced)")
            logits = reference.logits(ids, positions, embeds, mask)
    prompt = len(smoke.input_ids)
    return _Outputs(embeds, logits[:prompt], [int(t) for t in logits[prompt - 1:].argmax(-1)])


def _vision_kwargs(smoke: SmokeInput) -> dict[str, np.ndarray]:
    return smoke.vision.as_kwargs() if smoke.vision is not None else {}


def _paddle_forward(artifact: Path, resident: bool) -> PaddleForward:
    try:
        from vlhub.smoke.paddle_forward import PaddleForward
    except ImportError as exc:
        raise RuntimeMissing(f"running a Paddle checkpoint needs paddlepaddle ({exc}); "
                             "install it with: pip install 'vlhub[paddle]'") from None
    return PaddleForward(artifact if artifact.is_dir() else artifact.parent, streamed=not resident)


def _static_predictor(checkpoints: Path, weights: Path) -> StaticPredictor:
    try:
        from vlhub.targets.paddle_inference.static import StaticPredictor
    except ImportError as exc:
        raise RuntimeMissing(f"running Paddle Inference graphs needs paddlepaddle ({exc}); "
                             "install it with: pip install 'vlhub[paddle]'") from None
    return StaticPredictor(checkpoints, weights)


def _until_first_difference(reference: list[int], predicted: list[int]) -> list[int]:
    """The artifact's greedy tokens: its teacher-forced choices equal its own greedy output up to and
    including the first choice that differs from the reference."""
    for i, (a, b) in enumerate(zip(reference, predicted)):
        if a != b:
            return predicted[: i + 1]
    return predicted


def record_verdict(artifact: Path, verdict: dict) -> None:
    """Write a smoke verdict into the artifact's manifest (`smoke`), atomically."""
    manifest_path = Path(artifact) / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["smoke"] = verdict
    write_json_atomic(manifest_path, manifest)
