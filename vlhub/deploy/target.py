"""What a `vlhub convert --to` target is to the rest of vlhub: the `Target` protocol each folder's target.py
implements, and the pieces every target's options and plans are made of.

A target's options are a frozen dataclass whose fields are its `vlhub convert` flags (`flag()` gives each its
help), built once by the CLI from what was typed. `Target.settle` checks them against the model, once, and
returns the target's `Spec`: what its conversion, build and cache entry use. Nothing else of the CLI, `plan`,
`check` or `smoke` knows a target by name; they ask the registry (vlhub.targets).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from vlhub.convert.conversion import Conversion, Model, Output
from vlhub.deploy.checks import Check, LayoutContext, Need, common_build_needs
from vlhub.manifest import Manifest
from vlhub.sizes import Sizing

if TYPE_CHECKING:  # smoke.run is the smoke test's machinery, above this protocol
    from vlhub.smoke.run import SmokeRunner

OnBytes = Callable[[int], None] | None
Say = Callable[[str], None] | None  # reports the step a build is at, once its bytes are counted (a graph export)


def flag(help: str, default: Any = None, metavar: str | None = None) -> Any:
    """An options field that is the `vlhub convert` flag --<name> (underscores as dashes) with this help."""
    return field(default=default, metadata={"help": help, "metavar": metavar})


class Spec(Protocol):
    """A target's options settled against one model: what its conversion, build and cache entry use."""

    @property
    def dtype(self) -> str | None:
        """The conversion's cast (None: every tensor keeps its dtype)."""

    @property
    def allow_unmatched(self) -> bool:
        """Whether tensors the key map does not know pass through."""

    def cache_key(self) -> dict[str, object]:
        """The options that change what is written: they name the output's cache entry."""


class TargetPlan(Protocol):
    """A target's part of `vlhub plan`: the options that hold the planned inputs."""

    def command_options(self) -> str | None:
        """The `vlhub convert` options that build it (None: vlhub cannot build one this size)."""

    def summary(self) -> str:
        """Its compile sizes in a few words (vlhub check's `sizes for --image`)."""

    def rows(self, sizing: Sizing, command: str | None) -> list[tuple[str, str, str]]:
        """Its rows of plan's sizes table (size, value, why), the `command` that builds it among them."""

    def to_json(self) -> dict:
        """Its entry of `vlhub plan --json`'s targets (without the command, which the plan adds)."""


class Target(Protocol):
    """One `--to` target: a converted checkpoint format, or a deployment layout around converted weights."""

    name: str  # the --to name
    output: Output  # the weights it writes
    options: type  # the frozen dataclass of its flags (see `flag`)
    smoke_options: type | None  # the dataclass of its smoke test's own flags (`vlhub convert` and `vlhub smoke`)
    is_layout: bool  # a deployment layout (weights in a folder of it, its own files and numbers beside them)
    summary: str  # what convert prints after the output's path; {weights} is the weight folder
    # the files a layout of it holds, as globs (how `vlhub check` knows one whose manifest is gone), and where its
    # weight folder is in one (None: the output is the weight folder)
    marks: tuple[str, ...]
    weights_glob: str | None
    compile_outputs: tuple[str, ...]  # what its compile or run writes in a layout: never listed, never stray
    takes_patches: bool  # `vlhub plan --patches N` is a visual compile size of this target's
    # a plain checkpoint of its output format is checked as its weights (`vlhub check --target`): what its loaders read
    reads_plain_weights: bool

    def settle(self, options: Any, model: Model, *, smoke: bool) -> Spec:
        """Check the options against the model (UserError naming the flag and the valid range); the spec."""

    def require(self, spec: Any) -> None:
        """Refuse, before any work, a machine that cannot build it (a missing exporter, say)."""

    def written_bytes(self, weights: int, config: dict) -> int:
        """The disk the output takes, for `weights` bytes of converted weights of a model of this flat config."""

    def progress(self, conversion: Conversion, spec: Any) -> tuple[str, int]:
        """The progress bar's label and the bytes `build` reports."""

    def build(self, conversion: Conversion, spec: Any, out: Path, *, overwrite: bool, on_bytes: OnBytes,
              say: Say = None) -> Manifest:
        """Write the output into `out`, atomically; its manifest. `say` hears of steps `on_bytes` does not count."""

    def smoke_runner(self, layout: Path, manifest: Manifest | None, options: Any) -> SmokeRunner:
        """What runs the smoke test of the output at `layout` (its manifest, this target's smoke options)."""

    def plan(self, sizing: Sizing) -> TargetPlan | None:
        """Its options for the planned inputs (UserError when the model cannot take them); None: nothing to size."""

    def check_patches(self, config: dict, patches: int) -> None:
        """Refuse a given visual compile size (`vlhub plan --patches`) this target cannot build."""

    def vendor_files(self, family: str) -> tuple[str, ...]:
        """Files the user puts in the weight folder from the vendor (not stray, not listed in the manifest)."""

    def dtype_check(self, ctx: LayoutContext, stored: str | None) -> Check | None:
        """A problem with the weights' dtype (`stored`: most of their bytes) particular to this target."""

    def number_checks(self, ctx: LayoutContext) -> list[Check]:
        """The layout's compiled sizes against config.json and the --image sizes."""

    def toolchain_checks(self, family: str | None, weights: Path | None) -> list[Check]:
        """What the next step needs installed here (`weights`: the weight folder, when there is one yet)."""

    def build_needs(self, params: int, model_bytes: int) -> list[Need]:
        """Time the conversion takes beyond the common figures, and its smoke test's needs."""

    def next_needs(self, params: int, model_bytes: int, where: str) -> list[Need]:
        """What comes after the output is written: a compile, or loading it to serve."""


class TargetDefaults:
    """What a target does where it has nothing of its own: each target's class starts from these and overrides
    what it has (`Target` says what each is)."""

    name: str
    smoke_options: type | None = None
    marks: tuple[str, ...] = ()
    weights_glob: str | None = None
    compile_outputs: tuple[str, ...] = ()
    takes_patches = False
    reads_plain_weights = False

    def require(self, spec: Any) -> None:
        """Nothing beyond vlhub itself is needed to build it."""

    def written_bytes(self, weights: int, config: dict) -> int:
        return weights

    def plan(self, sizing: Sizing) -> TargetPlan | None:
        return None

    def check_patches(self, config: dict, patches: int) -> None:
        raise AssertionError(f"--to {self.name} takes no given visual compile size (takes_patches is false)")

    def vendor_files(self, family: str) -> tuple[str, ...]:
        return ()

    def dtype_check(self, ctx: LayoutContext, stored: str | None) -> Check | None:
        return None

    def number_checks(self, ctx: LayoutContext) -> list[Check]:
        return []

    def build_needs(self, params: int, model_bytes: int) -> list[Need]:
        return common_build_needs(params, model_bytes)
