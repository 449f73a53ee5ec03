"""`vlhub smoke`: run a converted checkpoint in its runtime and compare it with the reference on the source.

    runner = smoke_runner(Path("Qwen2-VL-7B-Instruct-paddle"))       # vlhub.targets: the target's own
    report = run_smoke(runner)                                       # source from the manifest
    report = run_smoke(runner, against=resolve_source("tiny-qwen2-vl"), tokens=4)
    report.passed, report.as_dict()

The reference (numpy, float32) runs on the source: vision tower, prefill, greedy decoding of `tokens` tokens.
The artifact runs in its runtime on the same input, teacher-forced with the reference's tokens, so a single pass
gives its prefill logits and its choice at every generated position. Models too large to hold comfortably in
float32 are streamed: one layer's weights at a time on both sides.

This module is what every target's smoke runner is made of (`Reference`, `compare_runs`, `checkpoint_outputs`);
each target's runner (vlhub/targets/<target>/) says what runs its output.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from vlhub.convert.configs import official_config
from vlhub.convert.plan import KeyMapMismatch
from vlhub.errors import CheckFailed, CorruptCheckpoint, UserError
from vlhub.hub.sources import resolve_source
from vlhub.manifest import MANIFEST, Manifest
from vlhub.owned import exclusive_lock, lock_file_of
from vlhub.smoke.inputs import SmokeInput, preprocessor_config, smoke_input, tokenizer_special_tokens
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
from vlhub.smoke.weights import ModelWeights, one_blas_thread

if TYPE_CHECKING:  # paddle is imported only when a Paddle checkpoint is run
    from vlhub.smoke.paddle_forward import PaddleForward

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
class Outputs:
    """What one side produced for the smoke input."""

    image_embeds: np.ndarray
    prompt_logits: np.ndarray
    tokens: list[int]
    token_logits: np.ndarray | None = None  # the reference's: [tokens, vocab], what each token was chosen from


Run = tuple[str, Callable[[], Outputs]]  # a label for its stages ("" for the artifact itself) and what produces it


class SmokeRunner(Protocol):
    """What runs one target's smoke test: `artifact`, what it tests (the manifest there names the source), and
    `run`, which makes the report."""

    artifact: Path

    def run(self, reference: Path, tokens: int, streamed: bool | None, say: Status) -> SmokeReport:
        """The report of the output against the checkpoint at `reference`."""


def run_smoke(runner: SmokeRunner, *, against: Path | None = None, tokens: int = DEFAULT_TOKENS,
              streamed: bool | None = None, status: Status | None = None) -> SmokeReport:
    """Smoke-test an output with its target's runner against the checkpoint at `against` (default: the source
    its manifest names).

    `streamed` None decides from the model's size and the memory available. Raises UserError when the test
    cannot run (no reference, different architectures, no runtime); a broken artifact is a failed report, not
    an error.
    """
    if tokens < 1:
        raise UserError("--tokens must be at least 1")
    if not runner.artifact.exists():
        raise UserError(f"no such file or directory: {runner.artifact}")
    reference = against or recorded_source(runner.artifact)
    started = time.monotonic()
    report = runner.run(reference, tokens, streamed, status or (lambda _message: None))
    report.seconds = time.monotonic() - started
    return report


@dataclass
class Reference:
    """The source side of a smoke test: its checkpoint, the smoke input made for it, and how it runs."""

    path: Path
    family: str
    config: dict
    smoke: SmokeInput
    resident: bool
    dtypes: dict[str, str]  # official name -> the source's dtype

    @classmethod
    def probe(cls, path: Path, streamed: bool | None) -> Reference:
        """Headers of the source, the smoke input for it, and whether it fits in memory (`streamed` None: by size)."""
        with ModelWeights.open(path) as probe:
            smoke = checkpoint_smoke_input(probe.checkpoint.root, probe.config)
            resident = not (streamed if streamed is not None else _too_large(probe.float32_bytes))
            dtypes = {step.target.name: step.source.dtype for step in probe.plan.steps}
            return cls(path, probe.family, probe.config, smoke, resident, dtypes)

    def report(self, artifact: Path, *, weights: Path | None = None, runtime: str | None = None) -> SmokeReport:
        """An empty report of `artifact`, whose weights (`weights`, default the artifact) must be this model's: run
        by `runtime` (default: paddle for Paddle weights, the numpy reference for the others), its precision class
        from both sides' dtypes. Weights that do not load are its failed "load" stage."""
        try:
            loaded = ModelWeights.open(weights or artifact)
        except KeyMapMismatch as exc:
            report = SmokeReport(str(artifact), str(self.path), runtime or "unknown", not self.resident,
                                 precision_class([]))
            report.stages.append(Stage("load", False, detail=str(exc)))
            return report
        with loaded:
            dims = [key for key in _ARCHITECTURE_KEYS if key in self.config]
            if loaded.family != self.family or any(loaded.config.get(k) != self.config.get(k) for k in dims):
                raise UserError(f"{artifact} is not the same architecture as the reference ({self.family}, "
                                f"{', '.join(f'{k} {self.config.get(k)}' for k in dims)}); pass --against a "
                                "checkpoint of this model")
            runtime = runtime or ("paddle" if loaded.checkpoint.format.name == "pdparams" else "reference")
            stored = {step.target.name: step.source.dtype for step in loaded.plan.steps}
        pairs = [(self.dtypes[name], dtype) for name, dtype in stored.items() if name in self.dtypes]
        return SmokeReport(str(artifact), str(self.path), runtime, not self.resident, precision_class(pairs))

    def outputs(self, tokens: int, say: Status) -> Outputs:
        """The reference's vision embeddings, prefill logits and `tokens` greedy tokens."""
        # broken weights overflow and produce NaN; the comparison reports that, numpy need not warn about it
        with (ModelWeights.open(self.path, resident=self.resident) as weights, np.errstate(all="ignore"),
              one_blas_thread()):
            forward = ReferenceForward(weights)
            say("reference: vision tower")
            embeds = forward.encode_images(self.smoke)
            say("reference: prefill and greedy decoding")
            prompt_logits, generated, token_logits = forward.generate(self.smoke, embeds, tokens, on_token=say)
        return Outputs(embeds, prompt_logits, generated, token_logits)


def compare_runs(reference: Reference, report: SmokeReport, tokens: int, say: Status,
                 runs: Callable[[Outputs], list[Run]]) -> Outputs:
    """Run the reference, then each of `runs(its outputs)`, and add each run's comparison to `report`'s stages (a run
    whose weights do not load into its network is a failed stage); the reference's outputs."""
    expected = reference.outputs(tokens, say)
    tolerance = TOLERANCES[report.precision]
    report.tokens_ref = expected.tokens
    for label, produce in runs(expected):
        try:
            with np.errstate(all="ignore"):
                produced = produce()
        except (CheckFailed, KeyMapMismatch) as exc:  # the artifact's weights do not load into the network
            report.stages.append(Stage(label + "load", False, detail=str(exc)))
            continue
        report.stages += _compare(label, expected, produced, tolerance)
        if not label:
            report.tokens_out = _until_first_difference(expected.tokens, produced.tokens)
    return expected


@dataclass
class CheckpointRunner:
    """The smoke test of converted weights: the checkpoint at `artifact` run in its runtime (Paddle for Paddle
    weights, the numpy reference for the others), teacher-forced, against the reference."""

    artifact: Path
    runtime: str | None = None  # None: Paddle for Paddle weights, the numpy reference for the others

    def run(self, reference: Path, tokens: int, streamed: bool | None, say: Status) -> SmokeReport:
        source = Reference.probe(reference, streamed)
        report = source.report(self.artifact, runtime=self.runtime)
        if not report.stages:  # the weights load
            compare_runs(source, report, tokens, say, lambda expected: [("", lambda: checkpoint_outputs(
                self.artifact, report.runtime, source.smoke, expected.tokens, source.resident, say))])
        return report


def checkpoint_smoke_input(root: Path, config: dict) -> SmokeInput:
    """The smoke input for the checkpoint in `root` (its config.json as read, its tokenizer files' special
    tokens, its preprocessor_config.json); raises UserError when no prompt can be made for it."""
    return smoke_input(official_config(config), tokenizer=tokenizer_special_tokens(root),
                       preprocessor=preprocessor_config(root))


def _compare(label: str, expected: Outputs, produced: Outputs, tolerance: Tolerance) -> list[Stage]:
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


def recorded_source(artifact: Path) -> Path:
    """The source the manifest beside `artifact` names (a catalog model is found, or rebuilt if tiny)."""
    directory = artifact if artifact.is_dir() else artifact.parent
    try:
        source = Manifest.load(directory).source
    except FileNotFoundError:
        raise UserError(f"{artifact} has no {MANIFEST} naming its source; pass --against SRC") from None
    except CorruptCheckpoint:
        raise CorruptCheckpoint(f"{directory / MANIFEST} is not a vlhub manifest; pass --against SRC") from None
    path = Path(source.path or "")
    if source.path and path.exists():
        return path
    if source.model:  # a catalog model (tiny ones are rebuilt on demand)
        return resolve_source(source.model)
    raise UserError(f"the source {artifact} was converted from ({source.path}) is gone; pass --against SRC")


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


def checkpoint_outputs(path: Path, runtime: str, smoke: SmokeInput, reference_tokens: list[int], resident: bool,
                       say: Status) -> Outputs:
    """A checkpoint's outputs (in Paddle for `runtime` paddle, else in the numpy reference) for the prompt followed
    by the reference's tokens (teacher forcing)."""
    follow = np.array(reference_tokens[:-1], dtype=np.int64)
    ids = np.concatenate([smoke.input_ids, follow])
    positions = np.concatenate([smoke.position_ids, smoke.positions_after(len(follow))], axis=-1)
    mask = np.concatenate([smoke.image_mask, np.zeros(len(follow), dtype=bool)])
    if runtime == "paddle":
        say("paddle: loading the network")  # importing Paddle and building the network: seconds of its own
        forward = _paddle_forward(path, resident)
        try:
            say("paddle: vision tower")
            embeds = forward.encode_images(smoke.pixel_values, **vision_kwargs(smoke))
            say("paddle: prefill (teacher-forced)")
            logits = forward.logits(ids, positions, embeds, mask)
        finally:
            forward.close()
    else:
        with ModelWeights.open(path, resident=resident) as weights, one_blas_thread():
            reference = ReferenceForward(weights)
            say("artifact: vision tower")
            embeds = reference.encode_images(smoke)
            say("artifact: prefill (teacher-forced)")
            logits = reference.logits(ids, positions, embeds, mask)
    prompt = len(smoke.input_ids)
    return Outputs(embeds, logits[:prompt], [int(t) for t in logits[prompt - 1:].argmax(-1)])


def vision_kwargs(smoke: SmokeInput) -> dict[str, np.ndarray]:
    """The smoke input's vision inputs as a Paddle network takes them (none for whole images)."""
    return smoke.vision.as_kwargs() if smoke.vision is not None else {}


def _paddle_forward(artifact: Path, resident: bool) -> PaddleForward:
    try:
        from vlhub.smoke.paddle_forward import PaddleForward
    except ImportError as exc:
        raise RuntimeMissing(f"running a Paddle checkpoint needs paddlepaddle ({exc}); "
                             "install it with: pip install 'vlhub[paddle]'") from None
    return PaddleForward(artifact if artifact.is_dir() else artifact.parent, streamed=not resident)


def _until_first_difference(reference: list[int], predicted: list[int]) -> list[int]:
    """The artifact's greedy tokens: its teacher-forced choices equal its own greedy output up to and
    including the first choice that differs from the reference."""
    for i, (a, b) in enumerate(zip(reference, predicted)):
        if a != b:
            return predicted[: i + 1]
    return predicted


def record_verdict(artifact: Path, verdict: dict) -> None:
    """Write a smoke verdict into the artifact's manifest (`smoke`), atomically, under the artifact's write lock (a
    `vlhub keys --in-place` of it must not be undone by a manifest read before it)."""
    # waits for a writer of the artifact, or another smoke recording its verdict: this one must not be lost
    with exclusive_lock(lock_file_of(Path(artifact)), what=str(artifact)):
        manifest = Manifest.load(Path(artifact))
        manifest.smoke = verdict
        manifest.write(Path(artifact))
