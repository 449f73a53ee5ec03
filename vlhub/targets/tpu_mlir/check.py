"""`vlhub check` of a TPU-MLIR layout: the weights' dtype against --quantize, the compile options and config.json
against what llm_convert takes, the --image sizes, the toolchain, and the compile's disk and memory."""

from __future__ import annotations

import os
import shutil
import subprocess

from vlhub.deploy.checks import (
    FAIL,
    PARAMS_7B,
    PASS,
    Check,
    LayoutContext,
    Need,
    image_fits,
    planned_fix,
    scaled,
    which_check,
)
from vlhub.errors import UserError
from vlhub.family_registry import FAMILIES
from vlhub.sizes import InputPlan, compile_sizes, plan_inputs
from vlhub.targets.tpu_mlir import NAME
from vlhub.targets.tpu_mlir.build import (
    PROMPT_TOKENS,
    QUANTIZE_DTYPE,
    TOOLCHAIN_DOC,
    TORCH_FIRST,
    TpuOptions,
    check_tpu_options,
    vision_fields,
)
from vlhub.targets.tpu_mlir.plan import tpu_mlir_options
from vlhub.targets.tpu_mlir.simulator import TOOLCHAIN_ENV, TOOLCHAIN_VERSION, resolve_toolchain

COMPILE_DISK = (100e9, "sophon-demo's Qwen2-VL README: >= 100 GB for 7B, scaled by parameters")
COMPILE_MEMORY = (15e9, "sophon-demo's Qwen2-VL README: >= 15 GB for 7B, scaled by parameters")


def recorded_options(ctx: LayoutContext) -> TpuOptions:
    """The compile options the manifest records, with the patch and merge sizes of the layout's config."""
    details = ctx.recorded.details
    family = FAMILIES.get(ctx.family or "")
    facts = family.route(NAME) if family is not None and family.routes_to(NAME) else {}
    vision = vision_fields(ctx.config or {}, facts)
    sizes = {name: int(vision[key]) for name, key in (("patch", "patch_size"), ("merge", "spatial_merge_size"))
             if isinstance(vision.get(key), int)}
    return TpuOptions(details["seq_length"], tuple(details["max_pixels"]), details["quantize"],
                      details.get("group_size") or 64, details["chip"], **sizes)


def dtype_check(ctx: LayoutContext, stored: str | None) -> Check | None:
    """Weights of another dtype than --quantize needs: llm_convert stops on the mismatch."""
    quantize = ctx.recorded.details.get("quantize")
    needed = QUANTIZE_DTYPE.get(quantize or "")
    if needed and needed != stored:
        return Check("weights", "dtype", FAIL, f"--quantize {quantize} needs {needed} weights, these are "
                     f"{stored}: llm_convert stops with a dtype mismatch", ctx.reconvert())
    return None


def number_checks(ctx: LayoutContext) -> list[Check]:
    """The compile options against config.json, the vision fields llm_convert reads, and each --image."""
    assert ctx.config is not None and ctx.family is not None
    options = recorded_options(ctx)
    width, height = options.max_pixels
    checks = []
    try:
        check_tpu_options(ctx.config, options)
        checks.append(Check("numbers", "compile options", PASS,
                            f"--seq-length {options.seq_length}, --max-pixels {width}x{height} "
                            f"({options.vision_patches} patches, {options.vision_tokens} vision tokens + "
                            f"{PROMPT_TOKENS} prompt), {options.quantize}, {options.chip}"))
    except UserError as exc:
        checks.append(Check("numbers", "compile options", FAIL, str(exc),
                            ctx.reconvert("with the options vlhub plan MODEL --target tpu-mlir gives")))
    vision = ctx.config.get("vision_config", {})
    family = FAMILIES[ctx.family]
    defaults = family.route(NAME)["vision_defaults"] if family.routes_to(NAME) else {}
    missing = [key for key in defaults if key not in vision]
    checks.append(Check("numbers", "llm_convert config", FAIL if missing else PASS,
                        f"vision_config lacks {', '.join(missing)}, which llm_convert reads without defaults"
                        if missing else "vision_config has every field llm_convert reads",
                        ctx.reconvert() if missing else ""))

    def shrunk(item: InputPlan) -> str:
        budget = plan_inputs(ctx.config or {}, [(item.width, item.height)], max_pixels=width * height)[0]
        return f": the processor shrinks it to {budget.resized_size} ({budget.patches} patches)"

    def holding(item: InputPlan) -> str:
        assert ctx.config is not None
        fitted = tpu_mlir_options(family, ctx.config, [item], compile_sizes(ctx.config, [item]))
        return f"--seq-length {fitted.seq_length} --max-pixels {fitted.max_pixels[0]}x{fitted.max_pixels[1]}"

    return checks + image_fits(ctx, (options.vision_patches, "the ViT's"), (options.seq_length, "--seq-length"),
                               lambda item: planned_fix(ctx, item, lambda: holding(item)), PROMPT_TOKENS, shrunk)


def toolchain_checks() -> list[Check]:
    """Python 3.10 with tpu-mlir, torch and psutil (compile.sh's interpreter), and GNU parallel."""
    return [_python_check(), which_check("GNU parallel", "parallel", "llm_convert runs its jobs with it",
                                         "apt-get install parallel")]


def _python_check() -> Check:
    name = f"Python {TOOLCHAIN_VERSION} + tpu-mlir"
    given = os.environ.get(TOOLCHAIN_ENV)
    fix = (f"install Python {TOOLCHAIN_VERSION} with tpu-mlir==1.30.2, torch and psutil and set {TOOLCHAIN_ENV} to "
           f"it ({TOOLCHAIN_DOC})")
    if not given and shutil.which("python3.10") is None:
        return Check("toolchain", name, FAIL, f"{TOOLCHAIN_ENV} is not set and python3.10 is not on PATH "
                     "(compile.sh uses one of them)", fix)
    try:
        python = resolve_toolchain(None if given else "python3.10")
    except UserError as exc:
        # resolve_toolchain names its argument as an option; here it is compile.sh's fallback
        said = str(exc) if given else str(exc).replace(
            "--tpu-mlir-python python3.10", f"python3.10 (compile.sh's default without {TOOLCHAIN_ENV})")
        return Check("toolchain", name, FAIL, said, fix)
    assert python is not None
    try:
        probe = subprocess.run([python, "-c", "import torch, psutil"], capture_output=True, text=True, timeout=300,
                               check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("toolchain", name, FAIL, f"{python} did not run: {exc}", fix)
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return Check("toolchain", name, FAIL, f"{python} has tpu_mlir but not torch and psutil ({reason})",
                     f"install {TORCH_FIRST}, then {python} -m pip install psutil")
    return Check("toolchain", name, PASS, f"{python}: Python {TOOLCHAIN_VERSION}, tpu_mlir, torch and psutil import")


def next_needs(params: int, where: str) -> list[Need]:
    """llm_convert's compile: sophon-demo's 7B disk and memory figures, scaled."""
    by_params = params / PARAMS_7B
    return [scaled("compile", "disk", COMPILE_DISK, by_params, where),
            scaled("compile", "memory", COMPILE_MEMORY, by_params),
            Need("compile", "time", None, None, "no published llm_convert time at real sizes; the tiny model "
                                                "compiled in 9.2 s here")]
