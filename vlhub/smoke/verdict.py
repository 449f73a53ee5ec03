"""How a smoke test decides: per-stage figures, and the tolerances they are held to.

The tolerance depends on what the conversion did to the weights, never on which checkpoint is
compared: when every converted tensor holds the source's values (same dtype, or a widening cast),
only float32 rounding separates the two forwards; a cast to float16 or bfloat16 changes the weights
and gets a looser, stated bound.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    """Bounds a stage must meet. `relative` bounds max |a - b| / max |reference|; a top-1 disagreement
    counts only where the reference's own margin between the two choices exceeds twice that bound
    (closer than that, the two logits may swap within tolerance)."""

    relative: float
    cosine: float


TOLERANCES: dict[str, Tolerance] = {
    # same values on both sides: differences are float32 summation order (measured ~1e-6 relative)
    "exact": Tolerance(relative=1e-4, cosine=0.99999),
    # bf16 -> fp16 is exact for normal values; fp32 -> fp16 rounds each weight by <= 2^-11 relative
    "float16": Tolerance(relative=2e-2, cosine=0.9999),
    # fp32/fp16 -> bf16 rounds each weight by <= 2^-8 relative
    "bfloat16": Tolerance(relative=1e-1, cosine=0.999),
}
_NARROWER = {("float32", "float16"), ("float32", "bfloat16"), ("float64", "float16"), ("float64", "bfloat16"),
             ("float64", "float32"), ("bfloat16", "float16"), ("float16", "bfloat16")}


def precision_class(pairs: list[tuple[str, str]]) -> str:
    """"exact", "float16" or "bfloat16" for (source dtype, converted dtype) pairs: the loosest narrowing."""
    narrowed = {target for source, target in pairs if (source, target) in _NARROWER}
    if "bfloat16" in narrowed:
        return "bfloat16"
    return "float16" if narrowed else "exact"


@dataclass
class Stage:
    """One compared output: figures, and whether they are within tolerance."""

    name: str
    passed: bool
    max_abs_diff: float | None = None
    relative: float | None = None
    cosine: float | None = None
    top1_agreement: float | None = None
    detail: str = ""

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and v != ""}


def compare_arrays(name: str, reference: np.ndarray, output: np.ndarray, tolerance: Tolerance, *,
                   top1: bool = False) -> Stage:
    """Figures for two arrays of one stage ([positions, features]); NaN or Inf anywhere fails."""
    if reference.shape != output.shape:
        return Stage(name, False, detail=f"shape {list(output.shape)}, reference {list(reference.shape)}")
    if not np.isfinite(output).all():
        bad = int((~np.isfinite(output)).sum())
        return Stage(name, False, detail=f"{bad} values are NaN or Inf")
    ref64, out64 = reference.astype(np.float64), output.astype(np.float64)
    diff = float(np.abs(ref64 - out64).max())
    scale = float(np.abs(ref64).max()) or 1.0
    norms = float(np.linalg.norm(ref64) * np.linalg.norm(out64))
    cosine = float((ref64 * out64).sum() / norms) if norms else 0.0
    stage = Stage(name, True, diff, diff / scale, cosine)
    problems = []
    if diff / scale > tolerance.relative:
        problems.append(f"max abs diff {diff:.3g} is {diff / scale:.2e} of the largest value (limit {tolerance.relative:g})")
    if cosine < tolerance.cosine:
        problems.append(f"cosine {cosine:.6f} < {tolerance.cosine}")
    if top1:
        ref_top, out_top = reference.argmax(-1), output.argmax(-1)
        stage.top1_agreement = float((ref_top == out_top).mean())
        rows = np.arange(len(reference))
        margin = ref64[rows, ref_top] - ref64[rows, out_top]
        decisive = int((margin > 2 * tolerance.relative * scale).sum())
        if decisive:
            problems.append(f"top-1 token differs at {decisive} of {len(reference)} positions")
    stage.passed = not problems
    stage.detail = "; ".join(problems)
    return stage


def compare_tokens(reference: list[int], predicted: list[int], ref_margins: list[float], limit: float) -> Stage:
    """Greedy tokens: the converted model's choice after each reference token (teacher-forced), which is
    its own greedy output up to the first difference. A difference inside the reference's near-tie
    margin (`limit`, absolute) is not a failure."""
    decisive = [i for i, (a, b) in enumerate(zip(reference, predicted)) if a != b and ref_margins[i] > limit]
    agreement = sum(a == b for a, b in zip(reference, predicted)) / max(len(reference), 1)
    detail = f"first differs at token {decisive[0] + 1}" if decisive else ""
    return Stage("generated tokens", not decisive, top1_agreement=agreement, detail=detail)


@dataclass
class SmokeReport:
    """The verdict of one smoke test and everything it measured."""

    artifact: str
    reference: str
    runtime: str
    streamed: bool
    precision: str
    tokens_ref: list[int] = field(default_factory=list)
    tokens_out: list[int] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)
    # stages this layout has that did not run here, each with why (e.g. no TPU-MLIR toolchain)
    skipped: list[Stage] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.stages) and all(stage.passed for stage in self.stages)

    def figure(self, attribute: str) -> float | None:
        """A headline figure: the prefill logits' (the stage every family has)."""
        stage = next((s for s in self.stages if s.name == "prefill logits"), None)
        return getattr(stage, attribute) if stage else None

    def as_dict(self) -> dict:
        return {
            "passed": self.passed,
            "state": "passed" if self.passed else "failed",
            "max_abs_diff": self.figure("max_abs_diff"),
            "cosine": self.figure("cosine"),
            "top1_agreement": self.figure("top1_agreement"),
            "tokens_ref": self.tokens_ref,
            "tokens_out": self.tokens_out,
            "precision": self.precision,
            "tolerance": asdict(TOLERANCES[self.precision]),
            "runtime": self.runtime,
            "streamed": self.streamed,
            "artifact": self.artifact,
            "reference": self.reference,
            "stages": [stage.as_dict() for stage in self.stages],
            "skipped": [stage.as_dict() for stage in self.skipped],
            "seconds": round(self.seconds, 2),
        }
