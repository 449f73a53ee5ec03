"""`vlhub check` of a vamc layout: the yamls' numbers against config.json and the --image sizes, vamc and the
vendor files, the recipe's pinned versions, and the compile's disk, memory and time."""

from __future__ import annotations

from pathlib import Path

import yaml

from vlhub.deploy.checks import (
    FAIL,
    PARAMS_7B,
    PASS,
    WARN,
    Check,
    LayoutContext,
    Need,
    image_fits,
    installed,
    plan_hint,
    planned_fix,
    scaled,
    which_check,
)
from vlhub.family_registry import FAMILIES
from vlhub.manifest import listed_path
from vlhub.sizes import InputPlan, max_pixels_for
from vlhub.targets.vamc.build import NAME, Recipe, vamc_problems
from vlhub.targets.vamc.plan import MAX_VAMC_PATCHES

COMPILE_SECONDS = (7 * 3600.0, "VastModelZOO: about 7 h a network for 7B, two, scaled by parameters")


def number_checks(ctx: LayoutContext) -> list[Check]:
    """The yamls' numbers (`vamc_problems`), and each --image against the visual N and the prefill."""
    assert ctx.config is not None
    problems = vamc_problems(ctx.path)
    details = ctx.recorded.details
    llm = yaml.safe_load(listed_path(ctx.path, details["llm"]["yaml"]).read_text())
    visual = yaml.safe_load(listed_path(ctx.path, details["visual"]["yaml"]).read_text())
    (prefill,), (longest,) = llm["frontend"]["shape"]["input_ids"]
    n, tp = visual["frontend"]["shape"]["pixel_values"][0], llm["frontend"]["model_kwargs"]["tp"]
    convert = ctx.reconvert("(vlhub plan MODEL --target vamc sizes them)")
    checks = [Check("numbers", "yaml numbers", FAIL, "; ".join(problems), convert) if problems else
              Check("numbers", "yaml numbers", PASS, f"visual N {n}, input_ids [[{prefill}],[{longest}]], tp {tp} of "
                    f"{ctx.config['num_key_value_heads']} KV heads: multiples of 16, consistent with config.json")]

    def fix(item: InputPlan) -> str:
        assert ctx.config is not None
        if item.patches > MAX_VAMC_PATCHES:
            return (f"vlhub builds a visual N up to {MAX_VAMC_PATCHES} patches: send images of at most "
                    f"{max_pixels_for(ctx.config, MAX_VAMC_PATCHES)} pixels (vastgenx --max_pixels); "
                    f"{plan_hint(ctx, item)}")
        return planned_fix(ctx, item, lambda: f"--max-pixels {item.resized[0] * item.resized[1]}")

    return checks + image_fits(ctx, (n, "the visual N"), (prefill, "the prefill"), fix)


def toolchain_checks(family: str | None, weights: Path | None) -> list[Check]:
    """vamc on PATH, the vendor modeling files in the weight folder (when there is one yet) and the recipe's pinned
    versions."""
    if family is None or not FAMILIES[family].routes_to(NAME):
        return []
    recipe = Recipe.of(FAMILIES[family])
    checks = [which_check("vamc", "vamc", "compile.sh runs vamc compile",
                          "install VastAI's vamc (VastModelZOO's docs) so that vamc is on PATH")]
    if weights is not None:
        checks.append(_vendor_check(recipe, weights))
    checks.append(_pins_check(recipe))
    return checks


def _vendor_check(recipe: Recipe, weights: Path) -> Check:
    missing = [name for name in recipe.vendor_files if not (weights / name).is_file()]
    if missing:
        return Check("toolchain", "vendor files", FAIL, f"{', '.join(missing)} not in {weights}: vamc builds the vacc "
                     "modeling config_vacc.json names", f"copy them from VastModelZOO {recipe.vendor_directory}/ into "
                     f"{weights}/")
    return Check("toolchain", "vendor files", PASS, f"{', '.join(recipe.vendor_files)} in {weights.name}/")


def _pins_check(recipe: Recipe) -> Check:
    pins = recipe.pyenv
    found = {name: installed(name) for name in pins}
    # a warn, not a fail: vamc may run in an environment of its own (the yamls' workspace.pyenv names it)
    differ = [f"{name} {got[1] if got else 'missing'} (recipe: {pins[name]})" for name, got in found.items()
              if got is None or got[1] != pins[name]]
    if differ:
        return Check("toolchain", "pinned versions", WARN, f"in this Python {', '.join(differ)}: vamc's huggingface "
                     "frontend loads the vacc modeling files with them, written against the recipe's versions",
                     "in vamc's environment: pip install " + " ".join(f"{name}=={v}" for name, v in pins.items()))
    return Check("toolchain", "pinned versions", PASS, ", ".join(f"{name} {version}" for name, version in pins.items()))


def next_needs(params: int, where: str) -> list[Need]:
    """vamc's compile: the float16 weights on disk and in memory, and VastModelZOO's 7B time for two networks."""
    half = 2 * params
    return [Need("compile", "disk", half, where, "no published figure: at least the float16 weights vamc writes, "
                                                 "parameters x 2 bytes"),
            Need("compile", "memory", half, None, "no published figure: vamc's huggingface frontend loads the "
                                                  "whole model in float16, parameters x 2 bytes"),
            scaled("compile", "time", COMPILE_SECONDS, 2 * params / PARAMS_7B)]
