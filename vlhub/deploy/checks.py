"""The vocabulary of `vlhub check` that each target's own checks are written in: a `Check` (one line of the
checklist), a `Need` (what a step takes), the `LayoutContext` every layout check reads, and the helpers several
targets share (installed versions, a command on PATH, paddlepaddle, resource figures, --image fits)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vlhub.convert.plan import Plan
from vlhub.errors import UserError
from vlhub.formats.readers import Checkpoint
from vlhub.manifest import Manifest, TargetRecord
from vlhub.sizes import DEFAULT_PROMPT_TOKENS, InputPlan, plan_inputs

PASS, WARN, FAIL = "pass", "warn", "fail"
STATUSES = (PASS, WARN, FAIL)

# the figures resource estimates scale from, by parameter count or bytes: Qwen2-VL-7B's, which every published
# figure is for
PARAMS_7B = 8_291_375_616
BYTES_7B = 2 * PARAMS_7B
CONVERT_SECONDS = (32.4, "Performance: 32.4 s for 16.6 GB, scaled by bytes")
# a conversion's buffers are bounded (tensors larger than a tile go in tiles): the figure holds at any size for a
# catalog model (experts stored one entry each are joined one expert at a time)
CONVERT_MEMORY = (531e6, ("Performance: 531 MB measured for 7B, 461 MB for a 72B-shaped lm_head; it does not "
                          "grow with the model"))
SMOKE_SECONDS = (58.8, "Performance: 58.8 s streamed for 16.6 GB, scaled by bytes")
SMOKE_MEMORY = (1.87e9, "Performance: 1.87 GB streamed for 7B, scaled by parameters")


@dataclass(frozen=True)
class Check:
    """One line of the checklist."""

    group: str
    name: str
    status: str  # pass, warn or fail
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class Need:
    """What a step takes: `amount` bytes of disk or memory, or seconds (None: no figure to estimate from)."""

    step: str  # download, convert, smoke, compile, serve, load
    resource: str  # disk, memory, time
    amount: float | None  # whole bytes; seconds to a tenth
    where: str | None  # disk: the directory it is written under
    source: str  # where the figure comes from


@dataclass
class LayoutContext:
    """What every layout check reads: the layout, its manifest, its weights (headers only) and config."""

    path: Path
    target: str
    manifest: Manifest | None
    weights: Path  # the weight folder
    images: tuple[tuple[int, int], ...] = ()
    smoke: bool = False
    checkpoint: Checkpoint | None = None
    open_error: str | None = None
    config: dict | None = None  # flat official form
    family: str | None = None
    layout: str | None = None  # the key layout detected
    plan: Plan | None = None  # the weights mapped onto the official tensors
    plan_problems: dict[str, list[str]] = field(default_factory=dict)  # or why they do not map

    @property
    def recorded(self) -> TargetRecord:
        """What the manifest says was written (empty without one)."""
        return self.manifest.target if self.manifest else TargetRecord()

    @property
    def model_name(self) -> str | None:
        """The catalog model the manifest says it was converted from."""
        return self.manifest.source.model if self.manifest else None

    def reconvert(self, options: str = "") -> str:
        """The fix that writes the layout again: its source from the manifest, this path, `options` (the layout's
        own otherwise)."""
        source = self.manifest.source if self.manifest else None
        name = (source.model or source.path if source else None) or "SRC"
        return f"convert again: vlhub convert {name} --to {self.target} --out {self.path} --overwrite " + (
            options or "(with the same options)")

    @property
    def model_bytes(self) -> int | None:
        return self.checkpoint.total_bytes if self.checkpoint else None

    @property
    def params(self) -> int | None:
        return sum(meta.numel for meta in self.checkpoint.tensors.values()) if self.checkpoint else None


def scaled(step: str, resource: str, figure: tuple[float, str], ratio: float, where: str | None = None) -> Need:
    """A need estimated from a published or measured (value, source) figure, scaled by `ratio` (the model's size
    over the figure's)."""
    value, source = figure
    amount = value * ratio
    return Need(step, resource, round(amount, 1) if resource == "time" else round(amount), where, source)


def common_build_needs(params: int, model_bytes: int) -> list[Need]:
    """A conversion's time and a streamed smoke test's memory and time, from the README's 7B figures."""
    by_bytes = model_bytes / BYTES_7B
    return [scaled("convert", "time", CONVERT_SECONDS, by_bytes),
            scaled("smoke", "memory", SMOKE_MEMORY, params / PARAMS_7B),
            scaled("smoke", "time", SMOKE_SECONDS, by_bytes)]


def installed(*distributions: str) -> tuple[str, str] | None:
    """(name, version) of the first of `distributions` installed in this Python."""
    for name in distributions:
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def which_check(name: str, command: str, why: str, fix: str) -> Check:
    """`command` on PATH, or a fail saying why it is needed and how to get it."""
    found = shutil.which(command)
    if found is None:
        return Check("toolchain", name, FAIL, f"{command} is not on PATH ({why})", fix)
    return Check("toolchain", name, PASS, found)


def paddle_check(required: bool, graphs: bool = False) -> Check:
    """paddlepaddle in this Python: a fail when `required` (a warn otherwise); with `graphs`, Paddle 3, which runs
    pir graphs."""
    found = installed("paddlepaddle", "paddlepaddle-gpu")
    # find_spec, not import: importing paddle takes seconds and vlhub check reads no weights with it
    if found is None or importlib.util.find_spec("paddle") is None:
        return Check("toolchain", "paddlepaddle", FAIL if required else WARN,
                     "paddlepaddle is not installed in this Python: the smoke test and Paddle's loaders need it",
                     "pip install 'vlhub[paddle]'")
    name, version = found
    major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0
    if graphs and major < 3:
        return Check("toolchain", "paddlepaddle", FAIL, f"{name} {version}: Paddle 3 runs the layout's pir graphs "
                     "(.json); 2.x reads only legacy .pdmodel",
                     "pip install 'paddlepaddle>=3', or convert with --ir legacy")
    return Check("toolchain", "paddlepaddle", PASS, f"{name} {version}")


def image_plans(ctx: LayoutContext) -> list[InputPlan]:
    """Each --image as `vlhub plan` counts it (the processor's default bounds)."""
    assert ctx.config is not None
    return plan_inputs(ctx.config, list(ctx.images)) if ctx.images else []


def image_check(ctx: LayoutContext, item: InputPlan, problems: list[str], fits: str,
                fix: Callable[[InputPlan], str]) -> Check:
    """The line of one --image: a pass saying how it fits, or a fail with its problems and `fix(item)`."""
    if not problems:
        return Check("numbers", item.label, PASS, fits)
    return Check("numbers", item.label, FAIL, "; ".join(problems), fix(item))


def image_fits(ctx: LayoutContext, patches: tuple[int, str], length: tuple[int, str], fix: Callable[[InputPlan], str],
               prompt: int = DEFAULT_PROMPT_TOKENS, shrunk: Callable[[InputPlan], str] | None = None) -> list[Check]:
    """Each --image's patches against the visual size, and its tokens and a prompt against the sequence length."""
    checks = []
    for item in image_plans(ctx):
        problems = []
        if item.patches > patches[0]:
            problems.append(f"{item.patches} patches, more than {patches[1]} {patches[0]}"
                            + (shrunk(item) if shrunk else ""))
        if item.tokens + prompt > length[0]:
            problems.append(f"{item.tokens} tokens + {prompt} prompt, more than {length[1]} {length[0]}")
        checks.append(image_check(ctx, item, problems, f"{item.patches} patches, {item.tokens} tokens + {prompt} "
                                  f"prompt: fits {patches[1]} {patches[0]} and {length[1]} {length[0]}", fix))
    return checks


def plan_hint(ctx: LayoutContext, item: InputPlan) -> str:
    """The `vlhub plan` command that says which sizes hold `item`, and why."""
    return f"vlhub plan {ctx.model_name or 'MODEL'} --image {item.width}x{item.height} --target {ctx.target} says why"


def planned_fix(ctx: LayoutContext, item: InputPlan, options: Callable[[], str]) -> str:
    """Convert again with `options()` (the sizes that hold `item`), or, when even those cannot be built, the
    `vlhub plan` command that says why."""
    try:
        return ctx.reconvert(options())
    except UserError:
        return plan_hint(ctx, item)
