"""The targets of `vlhub convert --to`, one folder each (the checkpoint formats share `checkpoint/`): its options
and how they settle against a model, its builder and exporters, its part of `vlhub plan` and `vlhub check`, and its
smoke runner. This module is the registry, one line per target: the CLI's --to choices and flags, `vlhub plan`'s
targets, `vlhub check`'s groups and the smoke runners all come from here. What a target is: `vlhub.deploy.target`."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from vlhub.convert.conversion import Conversion, open_source
from vlhub.deploy.target import Target
from vlhub.errors import UserError
from vlhub.formats.readers import open_checkpoint
from vlhub.hub.sources import locate_source
from vlhub.manifest import Manifest
from vlhub.smoke.run import SmokeRunner
from vlhub.targets.checkpoint.target import PADDLE, SAFETENSORS, TORCH
from vlhub.targets.paddle_inference.target import PADDLE_INFERENCE
from vlhub.targets.tpu_mlir.target import TPU_MLIR
from vlhub.targets.vamc.target import VAMC

# the order is the order users see them in: checkpoint formats, then layouts (plan's and check's order too)
TARGETS: dict[str, Target] = {target.name: target for target in (
    PADDLE, SAFETENSORS, TORCH,  # vlhub/targets/checkpoint/
    VAMC,  # vlhub/targets/vamc/
    TPU_MLIR,  # vlhub/targets/tpu_mlir/
    PADDLE_INFERENCE,  # vlhub/targets/paddle_inference/
)}


def target_named(name: str) -> Target:
    """The target `--to name` means; UserError naming the choices otherwise."""
    try:
        return TARGETS[name]
    except KeyError:
        raise UserError(f"unknown target format {name!r}; choose one of {', '.join(TARGETS)}") from None


def prepare_conversion(source: str, *, to: str, dtype: str | None = None, allow_unmatched: bool = False,
                       dry_run: bool = False) -> Conversion:
    """Plan converting SRC `--to` a target's weights (headers only; a dry run of a catalog model that is not on this
    machine plans from its official tensor list), for callers that name the target; the CLI plans through the
    target's own settled options instead."""
    output = target_named(to).output
    located = locate_source(source)
    if located.path is None and not dry_run:
        located.local()  # says how to get it
    opened = open_source(located)
    try:
        return opened.plan(output, dtype=dtype, allow_unmatched=allow_unmatched)
    except BaseException:
        opened.close()
        raise


def layouts() -> list[Target]:
    """The targets that write a deployment layout around their weights."""
    return [target for target in TARGETS.values() if target.is_layout]


def checkpoint_target(fmt: str) -> Target:
    """The checkpoint target that writes weights of format `fmt`."""
    plain = [target for target in TARGETS.values() if not target.is_layout]
    # a target that always writes `fmt` (safetensors, torch) before one whose families' layouts may (paddle)
    return next((target for target in plain if target.output.format == fmt),
                next(target for target in plain if fmt in target.output.formats()))


def recorded_target(manifest: Manifest) -> Target | None:
    """The target a manifest records: the layout it names, else the checkpoint format it records."""
    if manifest.target.name in TARGETS:
        return TARGETS[manifest.target.name]
    if manifest.target.format is None:
        return None
    return checkpoint_target(manifest.target.format)


def output_at(path: Path) -> tuple[Target, Manifest | None]:
    """The target that wrote the output at `path` and its manifest: the one the manifest records, else the
    checkpoint format the weights are stored in (headers only)."""
    manifest = Manifest.read(path if path.is_dir() else path.parent)
    recorded = recorded_target(manifest) if manifest is not None else None
    if recorded is not None:
        return recorded, manifest
    with open_checkpoint(path) as checkpoint:
        return checkpoint_target(checkpoint.format.name), manifest


def flag_names(cls: type | None) -> list[str]:
    """The flags (field names) an options or smoke-options dataclass declares."""
    return [f.name for f in fields(cls)] if cls is not None else []


def takers(name: str, *, smoke: bool = False) -> list[str]:
    """The targets whose options (smoke options, with `smoke`) include flag `name`."""
    return [target.name for target in TARGETS.values()
            if name in flag_names(target.smoke_options if smoke else target.options)]


def options_of(cls: type | None, given: dict[str, Any]) -> Any:
    """An options dataclass from the flags given (only those typed); None for a target without smoke options."""
    return cls(**given) if cls is not None else None


def smoke_runner(path: Path, given: dict[str, Any] | None = None) -> SmokeRunner:
    """What runs the smoke test of the output at `path`, with the smoke flags `given` (UserError for a flag of
    another target's smoke test)."""
    target, manifest = output_at(path)
    for name in given or {}:
        if name not in flag_names(target.smoke_options):
            raise UserError(f"--{name.replace('_', '-')} runs the smoke test of a vlhub convert --to "
                            f"{' or '.join(takers(name, smoke=True))} layout; {path} is not one")
    return target.smoke_runner(path, manifest, options_of(target.smoke_options, given or {}))
