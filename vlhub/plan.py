"""`vlhub plan`: what images and videos become (vlhub.sizes), and per deployment target the options that hold
them, each target sizing its own (vlhub/targets/<target>/plan.py), every one checked as `vlhub convert` checks it.

Compile sizes are for one input per request (one image per ViT call, as vastgenx and the TPU demos run it).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vlhub.catalog import find_model
from vlhub.convert.configs import official_config
from vlhub.deploy.target import Target, TargetPlan
from vlhub.errors import UserError
from vlhub.family_registry import Family
from vlhub.formats.readers import open_checkpoint
from vlhub.hub.sources import resolve_source
from vlhub.sizes import (
    DEFAULT_ANSWER_TOKENS,
    DEFAULT_PROMPT_TOKENS,
    CompileSizes,
    InputPlan,
    Sizing,
    compile_sizes,
    config_family,
    max_pixels_for,
    pixel_bounds,
    plan_inputs,
    resize_input,
)
from vlhub.smoke.inputs import preprocessor_config
from vlhub.targets import TARGETS, layouts


@dataclass(frozen=True)
class Refit:
    """An input resized to fit a visual compile size: with the largest max_pixels that keeps it within."""

    max_pixels: int  # per frame for a video
    input: InputPlan

    def to_json(self) -> dict:
        return {"max_pixels": self.max_pixels, **self.input.to_json()}


@dataclass(frozen=True)
class Plan:
    """Everything `vlhub plan` reports."""

    sizing: Sizing
    min_pixels: int | None  # None: a family that resizes every image to one size
    max_pixels: int | None
    refits: tuple[Refit | None, ...]  # per input: None when it fits sizing.fit_patches
    targets: dict[str, TargetPlan]  # each target the family has a route to and this model can take
    # targets the family has a route to that this model cannot take, each with why (only when no --target
    # was named: a named one that cannot take it is refused)
    unavailable: dict[str, str] = field(default_factory=dict)

    @property
    def model(self) -> str:
        return self.sizing.model

    @property
    def family(self) -> str:
        return self.sizing.family.name

    @property
    def inputs(self) -> tuple[InputPlan, ...]:
        return self.sizing.inputs

    @property
    def sizes(self) -> CompileSizes:
        return self.sizing.sizes

    def command(self, target: str) -> str | None:
        """The `vlhub convert` command that builds the target's layout with these sizes (None: one vlhub cannot
        build)."""
        options = self.targets[target].command_options()
        return None if options is None else f"vlhub convert {shlex.quote(self.model)} --to {target} {options}"

    def to_json(self) -> dict:
        sizing = self.sizing
        targets: dict[str, dict] = {name: {**plan.to_json(), "command": self.command(name)}
                                    for name, plan in self.targets.items()}
        targets.update({name: {"unavailable": why} for name, why in self.unavailable.items()})
        inputs = [{**item.to_json(), "fits": fitted is None, "refit": fitted and fitted.to_json()}
                  for item, fitted in zip(sizing.inputs, self.refits)]
        return {"model": self.model, "family": self.family, "min_pixels": self.min_pixels,
                "max_pixels": self.max_pixels, "prompt_tokens": sizing.prompt_tokens,
                "answer_tokens": sizing.answer_tokens, "fit_patches": sizing.fit_patches, "inputs": inputs,
                "compile": sizing.sizes.to_json(), "targets": targets}


def model_config(model: str) -> tuple[dict, dict]:
    """The flat official config of MODEL and its preprocessor_config.json: a local checkpoint's, else the
    catalog's config (its family's published preprocessor applies; nothing is downloaded), else that of a repo
    downloaded here."""
    spec = find_model(model)
    if spec is not None and not Path(model).expanduser().exists():  # an existing path wins, as in `locate_source`
        return official_config(spec.config), {}
    path = resolve_source(model)  # a path, or a repo downloaded here
    with open_checkpoint(path) as checkpoint:  # headers only
        config, root = checkpoint.config, checkpoint.root
    if not config:
        raise UserError(f"{path}: no config.json beside the weights; the plan reads the vision settings from it")
    return official_config(config), preprocessor_config(root)


def refuse_target(family: Family, target: str, model_type: str | None) -> Target:
    """The layout target `--target` names, refusing one vlhub does not plan or the family has no route to."""
    if target not in TARGETS or not TARGETS[target].is_layout:
        raise UserError(f"--target {target!r}: choose {', '.join(t.name for t in layouts())}")
    family.route(target, model_type)
    return TARGETS[target]


def refit(config: dict, item: InputPlan, patches: int, min_pixels: int) -> Refit:
    """`item` resized with the max_pixels `patches` allows (per frame: patches // t for a video)."""
    budget = max_pixels_for(config, patches // item.grid[0])
    return Refit(budget, resize_input(config, item.width, item.height, item.frames, min(min_pixels, budget),
                                      budget))


def _check_patches(family: Family, targets: list[Target], config: dict, patches: int) -> None:
    """Refuse --patches unless a planned target takes a given visual compile size, and one it cannot build."""
    owners = [target.name for target in layouts() if target.takes_patches]
    takers = [target for target in targets if target.takes_patches]
    if not takers:
        routed = [name for name in owners if family.routes_to(name, config.get("model_type"))]
        if routed:
            why = f"use it with --target {' or '.join(routed)}"
        else:
            try:
                family.route(owners[0], config.get("model_type"))
            except UserError as exc:
                why = str(exc)
        raise UserError(f"--patches is a {' or '.join(owners)} visual compile size: {why}")
    for target in takers:
        target.check_patches(config, patches)


def make_plan(model: str, *, images: Sequence[tuple[int, int]] = (), video: tuple[int, int, int] | None = None,
              min_pixels: int | None = None, max_pixels: int | None = None, patches: int | None = None,
              prompt_tokens: int = DEFAULT_PROMPT_TOKENS, answer_tokens: int = DEFAULT_ANSWER_TOKENS,
              target: str | None = None) -> Plan:
    """The plan for MODEL (see `model_config`): `target` alone, or every target the family has a route to.
    `patches` is a given visual compile size (of a target that takes one) to check each input against."""
    config, preprocessor = model_config(model)
    family = config_family(config)
    model_type = config.get("model_type")
    targets = ([refuse_target(family, target, model_type)] if target is not None
               else [t for t in layouts() if family.routes_to(t.name, model_type)])
    if patches is not None:
        _check_patches(family, targets, config, patches)
    bounds = pixel_bounds(config, min_pixels, max_pixels, preprocessor)
    inputs = tuple(plan_inputs(config, images, video, min_pixels=min_pixels, max_pixels=max_pixels,
                               preprocessor=preprocessor))
    sizes: CompileSizes = compile_sizes(config, inputs, prompt_tokens, answer_tokens)
    fit = sizes.visual_patches if patches is None else patches
    # without --patches every input fits by construction; a fixed-size family (no bounds) takes no --patches
    refits = tuple(None if item.patches <= fit or bounds is None else refit(config, item, fit, bounds[0])
                   for item in inputs)
    sizing = Sizing(model, family, config, inputs, sizes, fit, patches is not None, prompt_tokens, answer_tokens)
    planned: dict[str, TargetPlan] = {}
    unavailable: dict[str, str] = {}
    for each in targets:
        try:
            part = each.plan(sizing)
        except UserError as exc:  # without --target, a target this model cannot take is noted, not fatal
            if target is not None:
                raise
            unavailable[each.name] = str(exc)
            continue
        if part is not None:
            planned[each.name] = part
    # no target left (none takes this model, or none has a route: Qwen3-VL's MoE): the arithmetic stands, with the
    # notes saying why
    return Plan(sizing, *(bounds or (None, None)), refits, planned, unavailable)
