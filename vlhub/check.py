"""`vlhub check`: the pre-deployment checklist, for a layout vlhub wrote or for a catalog model before conversion.

    report = check_path(Path("./tiny-tpu"), target="auto", images=[(1280, 720)])
    report = check_model("qwen2-vl-7b", target="tpu-mlir")
    report.verdict, report.to_json()

Every check is a `Check` (group, name, status pass / warn / fail, detail, fix). A layout goes through the groups
in `LAYOUT_GROUPS`, each a function of a `LayoutContext`: integrity (manifest, recorded sha256, stray files), weights
(key layout, dtype, shapes against config.json, tied embeddings, a streamed NaN/Inf scan), numbers (the compiled
sizes against config.json and the --image sizes), toolchain, resources (disk and memory for the next step) and
smoke (the recorded verdict, or a new run). Resource estimates are `Need`s, each naming where its figure comes from.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import os
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

from vlhub.atomic import ensure_free_space
from vlhub.catalog import ModelSpec, find_model, unknown_model_message
from vlhub.convert.configs import official_config
from vlhub.convert.conversion import TARGETS as CONVERT_TARGETS
from vlhub.convert.layouts import detect_family, detect_layout
from vlhub.convert.plan import KeyMapMismatch, Plan, plan_conversion
from vlhub.errors import UserError, VlhubError
from vlhub.formats.readers import Checkpoint, config_dtype, open_checkpoint
from vlhub.formats.registry import FORMATS, format_of_file
from vlhub.hub.home import vlhub_home
from vlhub.hub.store import MANIFEST, manifest_problems, read_manifest
from vlhub.keymaps import load_keymap
from vlhub.keymaps.config import tie_word_embeddings
from vlhub.plan import (
    DEFAULT_ANSWER_TOKENS,
    DEFAULT_PROMPT_TOKENS,
    MAX_VAMC_PATCHES,
    InputPlan,
    compile_sizes,
    make_plan,
    max_pixels_for,
    plan_inputs,
    refuse_target,
    tpu_mlir_options,
)
from vlhub.plan import Plan as SizePlan  # vlhub.convert.plan has the conversion's Plan
from vlhub.smoke.run import available_memory, run_smoke
from vlhub.smoke.verdict import unfinished_summary
from vlhub.targets.paddle_inference.build import inference_dtype
from vlhub.targets.tpu_mlir.build import (
    PROMPT_TOKENS,
    QUANTIZE_DTYPE,
    TORCH_FIRST,
    VISION_DEFAULTS,
    TpuOptions,
    check_tpu_options,
)
from vlhub.targets.tpu_mlir.simulator import TOOLCHAIN_ENV, TOOLCHAIN_VERSION, resolve_toolchain
from vlhub.targets.vamc.build import PYENV, VENDOR, vamc_problems
from vlhub.units import format_size

PASS, WARN, FAIL = "pass", "warn", "fail"
STATUSES = (PASS, WARN, FAIL)
LAYOUT_TARGETS = ("paddle-inference", "tpu-mlir", "vamc")
TARGETS = ("auto", "paddle", "paddle-inference", "tpu-mlir", "vamc", "safetensors", "torch")
_TARGET_OF_FORMAT = {"pdparams": "paddle", "safetensors": "safetensors", "torch": "torch"}
# what a compile or a run writes inside a layout: never in the manifest, never stray
_OUTPUT_DIRS = ("compiled", "compiled_onnx", "vamc_results")
_SCAN_BLOCK = 64 << 20  # bytes of one tensor the NaN/Inf scan holds at a time

# The figures resource estimates scale from, by parameter count or bytes, and where each was published or measured.
_7B_PARAMS = 8_291_375_616  # Qwen2-VL-7B, the size every published figure below is for
_7B_BYTES = 2 * _7B_PARAMS
FIGURES = {
    "tpu_compile_disk": (100e9, "sophon-demo's Qwen2-VL README: >= 100 GB for 7B, scaled by parameters"),
    "tpu_compile_memory": (15e9, "sophon-demo's Qwen2-VL README: >= 15 GB for 7B, scaled by parameters"),
    "vamc_compile_seconds": (7 * 3600.0, "VastModelZOO: about 7 h a network for 7B, two, scaled by parameters"),
    "convert_seconds": (35.3, "README Performance: 35.3 s for 16.6 GB, scaled by bytes"),
    "paddle_inference_seconds": (79.1, "README Performance: 79.1 s for 16.6 GB, scaled by bytes"),
    "paddle_inference_smoke_seconds": (280.4 - 79.1, "README Performance: 201 s for 16.6 GB, scaled by bytes"),
    "smoke_seconds": (139.0, "README Performance: 139 s streamed for 16.6 GB, scaled by bytes"),
    "smoke_memory": (2.41e9, "README Performance: 2.41 GB streamed for 7B, scaled by parameters"),
    "paddle_inference_memory": (18.22e9, "README Performance: 18.22 GB for 16.6 GB of weights, scaled by bytes"),
}
_FAILS_WHEN_SHORT = ("download", "convert", "compile")  # steps that run here; "smoke", "serve" and "load" may not
_MEMORY_FIX = {"smoke": "convert with --no-smoke here, and smoke-test it on a machine with more memory",
               "serve": "serve it on a machine with more memory", "load": "load it on a machine with more memory"}


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
class Report:
    """The checklist and what it was run on; `to_json()` is `vlhub check --json`."""

    mode: str  # layout or model
    target: str
    path: str | None = None
    model: str | None = None
    family: str | None = None
    checks: list[Check] = field(default_factory=list)
    needs: list[Need] = field(default_factory=list)
    has: dict = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        counted = Counter(check.status for check in self.checks)
        return {status: counted.get(status, 0) for status in STATUSES}

    @property
    def verdict(self) -> str:
        counts = self.counts
        return FAIL if counts[FAIL] else WARN if counts[WARN] else PASS

    def failed(self, strict: bool = False) -> list[Check]:
        """The checks that make `vlhub check` exit 1: fails, and warns too when `strict`."""
        return [check for check in self.checks if check.status == FAIL or (strict and check.status == WARN)]

    def to_json(self) -> dict:
        return {"mode": self.mode, "path": self.path, "model": self.model, "target": self.target,
                "family": self.family, "verdict": self.verdict, "counts": self.counts,
                "checks": [asdict(check) for check in self.checks], "needs": [asdict(need) for need in self.needs],
                "has": self.has}


# ---------------------------------------------------------------------------------------------------------------------
# A layout (or a converted checkpoint) on disk


@dataclass
class LayoutContext:
    """What every layout check reads: the layout, its manifest, its weights (headers only) and config."""

    path: Path
    target: str
    manifest: dict | None
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
    def layout_target(self) -> dict:
        return (self.manifest or {}).get("target") or {}

    def reconvert(self, options: str = "") -> str:
        """The fix that writes the layout again: its source from the manifest, this path, `options` (the layout's
        own otherwise)."""
        source = (self.manifest or {}).get("source") or {}
        name = source.get("model") or source.get("path") or "SRC"
        return f"convert again: vlhub convert {name} --to {self.target} --out {self.path} --overwrite " + (
            options or "(with the same options)")

    @property
    def model_bytes(self) -> int | None:
        return self.checkpoint.total_bytes if self.checkpoint else None

    @property
    def params(self) -> int | None:
        return sum(meta.numel for meta in self.checkpoint.tensors.values()) if self.checkpoint else None

    @property
    def needs(self) -> list[Need]:
        """What the step after this layout takes (nothing to estimate from when the weights cannot be read)."""
        if self.params is None or self.model_bytes is None:
            return []
        return next_step_needs(self.target, self.params, self.model_bytes, str(self.path))


def check_path(path: Path, *, target: str = "auto", images: Sequence[tuple[int, int]] = (),
               smoke: bool = False) -> Report:
    """Run every check that applies to the layout or converted checkpoint at `path`."""
    if not path.is_dir():
        raise UserError(f"{path} is a file: vlhub check takes the directory vlhub convert wrote")
    manifest = read_manifest(path)
    chosen = _resolve_target(path, target, manifest)
    if images and chosen not in LAYOUT_TARGETS:
        raise UserError(f"--image checks compiled sizes, which only {', '.join(LAYOUT_TARGETS)} layouts have; "
                        f"a {chosen} checkpoint takes any size its processor allows")
    ctx = LayoutContext(path, chosen, manifest, _weights_folder(path, chosen, manifest), tuple(images), smoke)
    try:
        _open_weights(ctx)
        report = Report("layout", chosen, path=str(path), family=ctx.family,
                        model=((manifest or {}).get("source") or {}).get("model"))
        for group in LAYOUT_GROUPS:
            report.checks += group(ctx)
        report.needs = ctx.needs
        report.has = _has(report.needs)
    finally:
        if ctx.checkpoint is not None:
            ctx.checkpoint.close()
    return report


def _resolve_target(path: Path, target: str, manifest: dict | None) -> str:
    """`auto`: the manifest's target name, else the weights' format; a given target must agree with them."""
    if target not in TARGETS:
        raise UserError(f"--target {target!r}: choose one of {', '.join(TARGETS)}")
    if manifest is None and target in LAYOUT_TARGETS:
        return target  # a layout that lost its manifest: the integrity checks say so
    recorded = (manifest or {}).get("target") or {}
    found = recorded.get("name") or _TARGET_OF_FORMAT.get(recorded.get("format", ""))
    if manifest is None:
        found = _layout_by_shape(path)
        if found is None:
            with open_checkpoint(path) as checkpoint:  # headers only; no checkpoint here is bad input
                found = _TARGET_OF_FORMAT[checkpoint.format.name]
        elif target == "auto":
            return found
    if target == "auto":
        if found is None:
            raise UserError(f"{path}: its {MANIFEST} names no target; pass --target")
        return found
    if found == "paddle" and target == "paddle-inference":
        return target  # Paddle weights checked as what Paddle's inference loaders read (the key layout check says)
    if found is not None and found != target:
        kind = "layout" if found in LAYOUT_TARGETS else "checkpoint"
        raise UserError(f"{path} is a {found} {kind}, not {target}: pass --target {found} or leave --target out")
    return target


def _layout_by_shape(path: Path) -> str | None:
    """The layout target whose builder writes what `path` holds (for a layout whose manifest is gone)."""
    shapes = {"paddle-inference": ("checkpoints", "*-inference"), "tpu-mlir": ("model", "compile.sh"),
              "vamc": ("weights", "build_in")}
    return next((name for name, globs in shapes.items() if all(any(path.glob(g)) for g in globs)), None)


def _weights_folder(path: Path, target: str, manifest: dict | None) -> Path:
    """The folder a runtime loads the weights from: the manifest's `target.weights`, else where the builder puts
    it, else the directory itself."""
    recorded = ((manifest or {}).get("target") or {}).get("weights")
    if recorded:
        return path / recorded
    candidates = {"tpu-mlir": [path / "model"], "vamc": sorted((path / "weights").glob("*")),
                  "paddle-inference": sorted(path.glob("*-inference"))}.get(target, [path])
    return next((p for p in candidates if p.is_dir()), path)


def _open_weights(ctx: LayoutContext) -> None:
    """Headers of the weights the manifest lists (never a stray file a loader might prefer), the config, the plan."""
    try:
        ctx.checkpoint = open_checkpoint(_listed_weights(ctx))
    except VlhubError as exc:
        ctx.open_error = str(exc)
        return
    raw = ctx.checkpoint.config
    if not raw:
        ctx.open_error = f"no config.json in {ctx.weights}"
        return
    ctx.config = official_config(raw)
    ctx.family = detect_family(raw, list(ctx.checkpoint.tensors))
    ctx.layout = detect_layout(ctx.family, ctx.checkpoint.tensors, raw)
    try:
        ctx.plan = plan_conversion(ctx.checkpoint.tensors, raw, target_layout="official")
    except KeyMapMismatch as exc:
        ctx.plan_problems = exc.problems
    except UserError as exc:  # no family, no layout: the key layout check says so
        ctx.plan_problems = {"unreadable": [str(exc)]}


def _listed_weights(ctx: LayoutContext) -> Path:
    """The index or single weight file of the target's format that the manifest lists, else the weight folder."""
    fmt = FORMATS[CONVERT_TARGETS[ctx.target][1]]
    listed = set((ctx.manifest or {}).get("files", {}))
    prefix = ctx.weights.relative_to(ctx.path).as_posix()
    for name in (fmt.index_file, fmt.single_file):
        if (f"{prefix}/{name}" if prefix != "." else name) in listed and (ctx.weights / name).is_file():
            return ctx.weights / name
    return ctx.weights


# -- integrity --


def integrity_checks(ctx: LayoutContext) -> list[Check]:
    """The manifest is there; every file it lists has its recorded size and sha256; nothing else a loader reads."""
    convert = ctx.reconvert()
    if ctx.manifest is None:
        status = FAIL if ctx.target in LAYOUT_TARGETS else WARN
        return [Check("integrity", "manifest", status,
                      f"no readable {MANIFEST}: nothing records which files belong here or their sha256", convert),
                _stray_check(ctx)]
    files = ctx.manifest.get("files") or {}
    checks = [Check("integrity", "manifest", PASS,
                    f"{MANIFEST}: {len(files)} files, written by vlhub {ctx.manifest.get('vlhub_version', '?')} "
                    f"on {ctx.manifest.get('created', '?')}")]
    damaged = manifest_problems(ctx.path, ctx.manifest)
    total = sum(entry["size"] for entry in files.values())
    if damaged:
        checks.append(Check("integrity", "file hashes", FAIL,
                            f"{len(damaged)} of {len(files)} files differ from the manifest: {'; '.join(damaged)}",
                            convert))
    else:
        checks.append(Check("integrity", "file hashes", PASS,
                            f"{len(files)} files ({format_size(total)}): sizes and sha256 as recorded"))
    checks.append(_stray_check(ctx))
    return checks


def _stray_check(ctx: LayoutContext) -> Check:
    """Weight files the manifest does not list, in the weight folder (fail: a loader may pick one), and other
    unlisted files (warn)."""
    if ctx.manifest is None:
        others = ctx.checkpoint.other_formats if ctx.checkpoint else []
        if others:
            return Check("integrity", "stray files", FAIL,
                         f"{ctx.weights} also holds {', '.join(others)} weights; Paddle's loaders take safetensors, "
                         "then pdparams, then torch", "delete the weights of the other formats")
        return Check("integrity", "stray files", PASS, "one weight format in the weight folder")
    listed = set(ctx.manifest.get("files") or {}) | {MANIFEST}
    vendor = set(VENDOR.get(ctx.family or "", {}).get("files", ())) if ctx.target == "vamc" else set()
    stray_weights, unlisted = [], []
    for file in sorted(p for p in ctx.path.rglob("*") if p.is_file()):
        name = file.relative_to(ctx.path).as_posix()
        if name in listed or name.split("/")[0] in _OUTPUT_DIRS or file.name.startswith("."):
            continue
        in_weights = file.parent == ctx.weights
        if in_weights and file.name in vendor:
            continue
        if in_weights and (format_of_file(file.name) or file.name.endswith(".index.json")):
            stray_weights.append(name)
        else:
            unlisted.append(name)
    if stray_weights:
        paddle = CONVERT_TARGETS[ctx.target][1] == "pdparams"
        why = ("PaddleNLP and PaddleMIX load *.safetensors before *.pdparams"
               if paddle and any(name.endswith(".safetensors") for name in stray_weights)
               else "a loader may pick one of them instead of the weights the manifest lists")
        return Check("integrity", "stray files", FAIL,
                     f"weight files the manifest does not list, in {ctx.weights.name}/: {', '.join(stray_weights)}; "
                     f"{why}", f"delete {', '.join(stray_weights)}")
    if unlisted:
        return Check("integrity", "stray files", WARN, f"files the manifest does not list: {', '.join(unlisted)}",
                     "delete them if vlhub did not write them and you did not put them there on purpose")
    present = sorted(name for name in vendor if (ctx.weights / name).is_file())
    return Check("integrity", "stray files", PASS, "nothing beside the files the manifest lists"
                 + (f" and the vendor files ({', '.join(present)})" if present else ""))


# -- weights --


def weight_checks(ctx: LayoutContext) -> list[Check]:
    """Key layout and format, dtype, shapes against config.json, tied embeddings, no NaN or Inf."""
    if ctx.open_error or ctx.checkpoint is None or ctx.config is None:
        return [Check("weights", "weights readable", FAIL, ctx.open_error or f"no weights in {ctx.weights}",
                      ctx.reconvert())]
    if ctx.family is None:
        return [_layout_check(ctx), nan_check(ctx.checkpoint)]
    return [_layout_check(ctx), _dtype_check(ctx), _shape_check(ctx), _tied_check(ctx), nan_check(ctx.checkpoint)]


def expected_layout(target: str, family: str) -> str:
    """The key layout `target`'s loader reads: the first `vlhub convert` declares that the family has."""
    wanted = CONVERT_TARGETS[target][0]
    candidates = (wanted,) if isinstance(wanted, str) else wanted
    layouts = load_keymap(family).layouts
    return next((name for name in candidates if name in layouts), candidates[-1])


def _layout_check(ctx: LayoutContext) -> Check:
    assert ctx.checkpoint is not None
    fmt = CONVERT_TARGETS[ctx.target][1]
    if ctx.family is None:
        return Check("weights", "key layout", FAIL, "the keys are no Qwen-VL family model's",
                     "check config.json's model_type and the weights")
    wanted = expected_layout(ctx.target, ctx.family)
    problems = []
    if ctx.checkpoint.format.name != fmt:
        problems.append(f"the weights are {ctx.checkpoint.format.name}, {ctx.target} loads {fmt}")
    if ctx.layout != wanted:
        problems.append(f"the keys are in the {ctx.layout} layout, {ctx.target}'s loader reads {wanted}")
    problems += ctx.plan_problems.get("unreadable", [])
    for kind in ("unmatched", "ambiguous"):
        if ctx.plan_problems.get(kind):
            problems.append(f"{len(ctx.plan_problems[kind])} {kind} keys ({', '.join(ctx.plan_problems[kind][:3])})")
    if problems:
        return Check("weights", "key layout", FAIL, "; ".join(problems), ctx.reconvert())
    return Check("weights", "key layout", PASS, f"{ctx.family}, {wanted} keys in {fmt}: what {ctx.target} loads")


def _dtype_check(ctx: LayoutContext) -> Check:
    assert ctx.checkpoint is not None and ctx.config is not None
    declared = config_dtype(ctx.checkpoint.config)
    stored = Counter(meta.dtype for meta in ctx.checkpoint.tensors.values())
    floating = {dtype: n for dtype, n in stored.items() if dtype in ("bfloat16", "float16", "float32")}
    majority = max(floating, key=floating.__getitem__) if floating else None
    shown = ", ".join(f"{dtype} x{n}" for dtype, n in stored.most_common())
    convert = ctx.reconvert()
    if stored.get("uint16"):
        return Check("weights", "dtype", FAIL,
                     f"{stored['uint16']} tensors are stored as uint16 (how Paddle stores bfloat16) but config.json "
                     f"says {declared}: a loader reads the bf16 bits as numbers (1.0 becomes 16256.0)",
                     "if they are bfloat16, say dtype bfloat16 in config.json; else " + convert)
    if declared is None:
        return Check("weights", "dtype", WARN, f"config.json declares no dtype (the tensors are {shown}): loaders "
                     "then load float32", "set torch_dtype (Hugging Face) or dtype (Paddle) in config.json")
    if declared != majority:
        return Check("weights", "dtype", FAIL, f"config.json says {declared}, the tensors are {shown}: a loader "
                     "allocates the one and reads the other", convert)
    if ctx.target == "paddle-inference":
        try:
            inference_dtype(ctx.family or "", majority, majority or "")
        except UserError as exc:
            return Check("weights", "dtype", FAIL, f"{majority} weights, which this family's inference loader "
                         f"misreads ({exc})", ctx.reconvert("--dtype float16"))
        recorded = ctx.layout_target.get("dtype")
        if recorded and recorded != majority:
            return Check("weights", "dtype", FAIL, f"the manifest says {recorded}, the weights are {majority}", convert)
    if ctx.target == "tpu-mlir":
        quantize = ctx.layout_target.get("quantize")
        needed = QUANTIZE_DTYPE.get(quantize or "")
        if needed and needed != majority:
            return Check("weights", "dtype", FAIL, f"--quantize {quantize} needs {needed} weights, these are "
                         f"{majority}: llm_convert stops with a dtype mismatch", convert)
    return Check("weights", "dtype", PASS, f"{shown}; config.json says {declared}")


def _shape_check(ctx: LayoutContext) -> Check:
    assert ctx.config is not None
    missing = [f"{name} missing" for name in ctx.plan_problems.get("missing", [])]
    wrong = ctx.plan_problems.get("mis-shaped", []) + missing
    dims = ", ".join(f"{key} {ctx.config.get(key)}" for key in ("hidden_size", "num_hidden_layers", "vocab_size")
                     if key in ctx.config)
    if wrong:
        return Check("weights", "shapes", FAIL, f"{len(wrong)} tensors disagree with config.json ({dims}): "
                     f"{'; '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''}",
                     "put the model's own config.json beside the weights, or convert again")
    if "unreadable" in ctx.plan_problems:
        return Check("weights", "shapes", WARN, "not compared: the keys are in no layout vlhub knows")
    assert ctx.checkpoint is not None
    return Check("weights", "shapes", PASS, f"{len(ctx.checkpoint.tensors)} tensors as config.json says ({dims})")


def _tied_check(ctx: LayoutContext) -> Check:
    assert ctx.checkpoint is not None and ctx.family is not None
    tied = tie_word_embeddings(ctx.checkpoint.config or {})
    layouts = load_keymap(ctx.family).layouts
    head = layouts[ctx.layout].from_official("lm_head.weight") if ctx.layout in layouts else "lm_head.weight"
    stored = head in ctx.checkpoint.tensors
    if tied and stored:
        return Check("weights", "tied embeddings", WARN,
                     f"config.json ties lm_head to the embedding, yet {head} is stored: a loader that ties ignores "
                     "it, one that does not uses it",
                     "set tie_word_embeddings to what the model is (its official config.json says)")
    if not tied and not stored:
        return Check("weights", "tied embeddings", FAIL,
                     f"config.json says lm_head is its own tensor, and there is no {head}: a loader would leave it "
                     "random", "set tie_word_embeddings true if the model ties them, else convert again")
    return Check("weights", "tied embeddings", PASS,
                 "tied: no lm_head stored, it is the embedding" if tied else f"untied: {head} stored")


def nan_check(checkpoint: Checkpoint) -> Check:
    """Every floating tensor scanned for NaN and Inf, a block of rows at a time: memory stays at one block."""
    started, found, scanned = time.monotonic(), {}, 0
    for meta in checkpoint.tensors.values():
        if meta.dtype not in ("bfloat16", "float16", "float32", "float64") or not meta.numel:
            continue
        scanned += meta.nbytes
        rows = max(1, _SCAN_BLOCK // max(1, meta.nbytes // meta.shape[0])) if len(meta.shape) == 2 else 0
        blocks = checkpoint.iter_blocks(meta.name, rows) if rows else [checkpoint.read(meta.name)]
        bad = sum(_non_finite(block, meta.dtype) for block in blocks)
        if bad:
            found[meta.name] = bad
    seconds = time.monotonic() - started
    if found:
        listed = "; ".join(f"{name}: {count}" for name, count in list(found.items())[:4])
        return Check("weights", "NaN/Inf", FAIL, f"{sum(found.values())} NaN or Inf values in {len(found)} tensors "
                     f"({listed}{' ...' if len(found) > 4 else ''})",
                     "the source or the conversion is broken: check the source with vlhub check, then convert again")
    return Check("weights", "NaN/Inf", PASS, f"none in {format_size(scanned)} of weights (scanned in {seconds:.1f} s)")


def _non_finite(block: np.ndarray, dtype: str) -> int:
    if dtype == "bfloat16":  # uint16 bits: the exponent all ones is Inf or NaN
        return int(np.count_nonzero((block & 0x7F80) == 0x7F80))
    return int(block.size - np.count_nonzero(np.isfinite(block)))


# -- numbers --


def number_checks(ctx: LayoutContext) -> list[Check]:
    """The layout's compiled sizes against config.json, and against every --image."""
    if ctx.target not in LAYOUT_TARGETS or ctx.config is None or ctx.manifest is None:
        return []
    if not ctx.layout_target.get("name"):  # weights without the layout around them: nothing compiled
        return []
    try:
        return _NUMBERS[ctx.target](ctx)
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as exc:
        return [Check("numbers", "compile sizes", FAIL, f"the layout's numbers cannot be read ({exc!r})",
                      ctx.reconvert())]


def _tpu_numbers(ctx: LayoutContext) -> list[Check]:
    assert ctx.config is not None
    target = ctx.layout_target
    options = TpuOptions(target["seq_length"], tuple(target["max_pixels"]), target["quantize"],
                         target.get("group_size") or 64, target["chip"])
    width, height = options.max_pixels
    checks = []
    try:
        check_tpu_options(ctx.config, options)
        checks.append(Check("numbers", "compile options", PASS,
                            f"--seq-length {options.seq_length}, --max-pixels {width},{height} "
                            f"({options.vision_patches} patches, {options.vision_tokens} vision tokens + "
                            f"{PROMPT_TOKENS} prompt), {options.quantize}, {options.chip}"))
    except UserError as exc:
        checks.append(Check("numbers", "compile options", FAIL, str(exc),
                            ctx.reconvert("with the options vlhub plan MODEL --target tpu-mlir gives")))
    vision = ctx.config.get("vision_config", {})
    missing = [key for key in VISION_DEFAULTS.get(ctx.family or "", {}) if key not in vision]
    checks.append(Check("numbers", "llm_convert config", FAIL if missing else PASS,
                        f"vision_config lacks {', '.join(missing)}, which llm_convert reads without defaults"
                        if missing else "vision_config has every field llm_convert reads",
                        ctx.reconvert() if missing else ""))

    def shrunk(item: InputPlan) -> str:
        budget = plan_inputs(ctx.config or {}, [(item.width, item.height)], max_pixels=width * height)[0]
        return f": the processor shrinks it to {budget.resized[1]}x{budget.resized[0]} ({budget.patches} patches)"

    return checks + _image_fits(ctx, (options.vision_patches, "the ViT's"), (options.seq_length, "--seq-length"),
                                PROMPT_TOKENS, shrunk)


def _vamc_numbers(ctx: LayoutContext) -> list[Check]:
    assert ctx.config is not None
    problems = vamc_problems(ctx.path)
    target = ctx.layout_target
    llm = yaml.safe_load((ctx.path / target["llm"]["yaml"]).read_text())
    visual = yaml.safe_load((ctx.path / target["visual"]["yaml"]).read_text())
    (prefill,), (longest,) = llm["frontend"]["shape"]["input_ids"]
    n, tp = visual["frontend"]["shape"]["pixel_values"][0], llm["frontend"]["model_kwargs"]["tp"]
    convert = ctx.reconvert("(vlhub plan MODEL --target vamc sizes them)")
    checks = [Check("numbers", "yaml numbers", FAIL, "; ".join(problems), convert) if problems else
              Check("numbers", "yaml numbers", PASS, f"visual N {n}, input_ids [[{prefill}],[{longest}]], tp {tp} of "
                    f"{ctx.config['num_key_value_heads']} KV heads: multiples of 16, consistent with config.json")]
    return checks + _image_fits(ctx, (n, "the visual N"), (prefill, "the prefill"), DEFAULT_PROMPT_TOKENS)


def _paddle_inference_numbers(ctx: LayoutContext) -> list[Check]:
    assert ctx.config is not None
    max_seq_len = int(ctx.layout_target["max_seq_len"])
    qwen_vl = ctx.family == "qwen_vl"
    # Qwen-VL's graph stops at seq_length: past it the model scales its rotary (dynamic NTK), a static graph cannot
    why = "seq_length" if qwen_vl else "max_position_embeddings"
    limit = int(ctx.config.get(why) or (2048 if qwen_vl else 32768))
    checks = [Check("numbers", "sequence length", FAIL if max_seq_len > limit else PASS,
                    f"--max-seq-len {max_seq_len}, the model's {why} is {limit}",
                    ctx.reconvert(f"--max-seq-len {limit} or less") if max_seq_len > limit else "")]
    for item in _image_plans(ctx):
        needed = item.tokens + DEFAULT_PROMPT_TOKENS + DEFAULT_ANSWER_TOKENS
        wrong = [(f"{item.tokens} tokens + {DEFAULT_PROMPT_TOKENS} prompt + {DEFAULT_ANSWER_TOKENS} answer = {needed}, "
                 f"more than --max-seq-len {max_seq_len}")] if needed > max_seq_len else []
        checks.append(_image_check(ctx, item, wrong, f"{item.tokens} tokens + prompt and answer = {needed} of "
                                   f"--max-seq-len {max_seq_len}"))
    return checks


_NUMBERS: dict[str, Callable[[LayoutContext], list[Check]]] = {
    "tpu-mlir": _tpu_numbers, "vamc": _vamc_numbers, "paddle-inference": _paddle_inference_numbers}


def _image_fits(ctx: LayoutContext, patches: tuple[int, str], length: tuple[int, str], prompt: int,
                shrunk: Callable[[InputPlan], str] | None = None) -> list[Check]:
    """Each --image's patches against the visual size, and its tokens and a prompt against the sequence length."""
    checks = []
    for item in _image_plans(ctx):
        problems = []
        if item.patches > patches[0]:
            problems.append(f"{item.patches} patches, more than {patches[1]} {patches[0]}"
                            + (shrunk(item) if shrunk else ""))
        if item.tokens + prompt > length[0]:
            problems.append(f"{item.tokens} tokens + {prompt} prompt, more than {length[1]} {length[0]}")
        checks.append(_image_check(ctx, item, problems, f"{item.patches} patches, {item.tokens} tokens + {prompt} "
                                   f"prompt: fits {patches[1]} {patches[0]} and {length[1]} {length[0]}"))
    return checks


def _image_plans(ctx: LayoutContext) -> list[InputPlan]:
    """Each --image as `vlhub plan` counts it (the processor's default bounds)."""
    assert ctx.config is not None
    return plan_inputs(ctx.config, list(ctx.images)) if ctx.images else []


def _image_check(ctx: LayoutContext, item: InputPlan, problems: list[str], fits: str) -> Check:
    if not problems:
        return Check("numbers", item.label, PASS, fits)
    return Check("numbers", item.label, FAIL, "; ".join(problems), _image_fix(ctx, item))


def _image_fix(ctx: LayoutContext, item: InputPlan) -> str:
    """The conversion options whose compiled sizes hold `item` at the processor's default resolution."""
    assert ctx.config is not None
    model = ((ctx.manifest or {}).get("source") or {}).get("model") or "MODEL"
    planned = f"vlhub plan {model} --image {item.width}x{item.height} --target {ctx.target} says why"
    try:
        if ctx.target == "tpu-mlir":
            options = tpu_mlir_options(ctx.config, [item], compile_sizes(ctx.config, [item]))
            return ctx.reconvert(f"--seq-length {options.seq_length} --max-pixels "
                                 f"{options.max_pixels[0]},{options.max_pixels[1]}")
        if ctx.target == "vamc":
            if item.patches > MAX_VAMC_PATCHES:
                return (f"vlhub builds a visual N up to {MAX_VAMC_PATCHES} patches: send images of at most "
                        f"{max_pixels_for(ctx.config, MAX_VAMC_PATCHES)} pixels (vastgenx --max_pixels); {planned}")
            return ctx.reconvert(f"--max-pixels {item.resized[0] * item.resized[1]}")
        return ctx.reconvert(f"--max-seq-len {compile_sizes(ctx.config, [item]).max_length}")
    except UserError:
        return planned


# -- toolchain --


def toolchain_checks(target: str, family: str | None, weights: Path | None = None) -> list[Check]:
    """What the next step needs installed here: paddlepaddle; Python 3.10 with tpu-mlir and GNU parallel; vamc,
    the vendor modeling files in the weight folder (`weights`, when there is one yet) and the pinned versions."""
    if target in ("paddle", "paddle-inference"):
        return [_paddle_check(target)]
    if target == "tpu-mlir":
        return [_tpu_python_check(), _which_check("GNU parallel", "parallel", "llm_convert runs its jobs with it",
                                                  "apt-get install parallel")]
    if target == "vamc" and family in VENDOR:
        checks = [_which_check("vamc", "vamc", "compile.sh runs vamc compile",
                               "install VastAI's vamc (VastModelZOO's docs) so that vamc is on PATH")]
        if weights is not None:
            checks.append(_vendor_check(family, weights))
        checks.append(_pins_check(family))
        return checks
    return []


def _installed(*distributions: str) -> tuple[str, str] | None:
    """(name, version) of the first of `distributions` installed in this Python."""
    for name in distributions:
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _paddle_check(target: str) -> Check:
    installed = _installed("paddlepaddle", "paddlepaddle-gpu")
    # find_spec, not import: importing paddle takes seconds and vlhub check reads no weights with it
    if installed is None or importlib.util.find_spec("paddle") is None:
        return Check("toolchain", "paddlepaddle", FAIL if target == "paddle-inference" else WARN,
                     "paddlepaddle is not installed in this Python: the smoke test and Paddle's loaders need it",
                     "pip install 'vlhub[paddle]'")
    name, version = installed
    major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0
    if target == "paddle-inference" and major < 3:
        return Check("toolchain", "paddlepaddle", FAIL, f"{name} {version}: Paddle 3 runs the layout's pir graphs "
                     "(.json); 2.x reads only legacy .pdmodel",
                     "pip install 'paddlepaddle>=3', or convert with --ir legacy")
    return Check("toolchain", "paddlepaddle", PASS, f"{name} {version}")


def _tpu_python_check() -> Check:
    name = f"Python {TOOLCHAIN_VERSION} + tpu-mlir"
    given = os.environ.get(TOOLCHAIN_ENV)
    fix = (f"install Python {TOOLCHAIN_VERSION} with tpu-mlir==1.30.2, torch and psutil and set {TOOLCHAIN_ENV} to "
           "it (README: the TPU-MLIR toolchain)")
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


def _which_check(name: str, command: str, why: str, fix: str) -> Check:
    found = shutil.which(command)
    if found is None:
        return Check("toolchain", name, FAIL, f"{command} is not on PATH ({why})", fix)
    return Check("toolchain", name, PASS, found)


def _vendor_check(family: str, weights: Path) -> Check:
    vendor = VENDOR[family]
    missing = [name for name in vendor["files"] if not (weights / name).is_file()]
    if missing:
        return Check("toolchain", "vendor files", FAIL, f"{', '.join(missing)} not in {weights}: vamc builds the vacc "
                     "modeling config_vacc.json names", f"copy them from VastModelZOO {vendor['directory']}/ into "
                     f"{weights}/")
    return Check("toolchain", "vendor files", PASS, f"{', '.join(vendor['files'])} in {weights.name}/")


def _pins_check(family: str) -> Check:
    pins = PYENV[family]
    found = {name: _installed(name) for name in pins}
    # a warn, not a fail: vamc may run in an environment of its own (the yamls' workspace.pyenv names it)
    differ = [f"{name} {got[1] if got else 'missing'} (recipe: {pins[name]})" for name, got in found.items()
              if got is None or got[1] != pins[name]]
    if differ:
        return Check("toolchain", "pinned versions", WARN, f"in this Python {', '.join(differ)}: vamc's huggingface "
                     "frontend loads the vacc modeling files with them, written against the recipe's versions",
                     "in vamc's environment: pip install " + " ".join(f"{name}=={v}" for name, v in pins.items()))
    return Check("toolchain", "pinned versions", PASS, ", ".join(f"{name} {version}" for name, version in pins.items()))


def layout_toolchain_checks(ctx: LayoutContext) -> list[Check]:
    return toolchain_checks(ctx.target, ctx.family, ctx.weights)


def layout_resource_checks(ctx: LayoutContext) -> list[Check]:
    return resource_checks(ctx.needs)


# -- resources --


def _scaled(step: str, resource: str, figure: str, ratio: float, where: str | None = None) -> Need:
    """A need estimated from one of FIGURES, scaled by `ratio` (the model's size over the figure's)."""
    value, source = FIGURES[figure]
    amount = value * ratio
    return Need(step, resource, round(amount, 1) if resource == "time" else round(amount), where, source)


def next_step_needs(target: str, params: int, model_bytes: int, where: str) -> list[Need]:
    """What comes after the layout is written: the compile (tpu-mlir, vamc), or loading it to serve."""
    by_params = params / _7B_PARAMS
    if target == "tpu-mlir":
        return [_scaled("compile", "disk", "tpu_compile_disk", by_params, where),
                _scaled("compile", "memory", "tpu_compile_memory", by_params),
                Need("compile", "time", None, None, "no published llm_convert time at real sizes; the tiny model "
                                                    "compiled in 9.2 s here")]
    if target == "vamc":
        half = 2 * params
        return [Need("compile", "disk", half, where, "no published figure: at least the float16 weights vamc writes, "
                                                     "parameters x 2 bytes"),
                Need("compile", "memory", half, None, "no published figure: vamc's huggingface frontend loads the "
                                                      "whole model in float16, parameters x 2 bytes"),
                _scaled("compile", "time", "vamc_compile_seconds", 2 * by_params)]
    if target == "paddle-inference":
        return [_scaled("serve", "memory", "paddle_inference_memory", model_bytes / _7B_BYTES)]
    return [Need("load", "memory", model_bytes, None, "the whole model in its stored dtype")]


def resource_checks(needs: list[Need]) -> list[Check]:
    """Disk per filesystem and memory per step against what this machine has (disk keeps VLHUB_MIN_FREE free)."""
    checks = []
    disks: dict[int, list[Need]] = {}
    for need in needs:
        if need.resource == "disk" and need.amount is not None and need.where:
            disks.setdefault(_device(Path(need.where)), []).append(need)
    for group in disks.values():
        total = int(sum(need.amount or 0 for need in group))
        where = Path(group[0].where or ".")
        steps = " + ".join(f"{need.step} {format_size(need.amount or 0)}" for need in group)
        status = FAIL if any(need.step in _FAILS_WHEN_SHORT for need in group) else WARN
        try:
            ensure_free_space(where, total, steps)
        except UserError as exc:
            checks.append(Check("resources", "disk", status, f"{exc} ({'; '.join(need.source for need in group)})",
                                "free disk space there, or work on a larger disk"))
            continue
        checks.append(Check("resources", "disk", PASS, f"{steps} under {where}: {format_size(_free(where))} free "
                            f"({'; '.join(need.source for need in group)})"))
    memory = available_memory()
    for need in needs:
        if need.resource != "memory" or need.amount is None:
            continue
        short = need.amount > memory
        status = (FAIL if need.step in _FAILS_WHEN_SHORT else WARN) if short else PASS
        fix = _MEMORY_FIX.get(need.step, "run it on a machine with more memory") if short else ""
        checks.append(Check("resources", f"memory ({need.step})", status,
                            f"needs about {format_size(need.amount)}, {format_size(memory)} available ({need.source})",
                            fix))
    times = [need for need in needs if need.resource == "time"]
    if times:
        checks.append(Check("resources", "time", PASS, "; ".join(
            f"{need.step} {_duration(need.amount)}: {need.source}" for need in times)))
    return checks


def _existing(path: Path) -> Path:
    return next(p for p in (path, *path.parents) if p.exists())


def _device(path: Path) -> int:
    return _existing(path).stat().st_dev


def _free(path: Path) -> int:
    return shutil.disk_usage(_existing(path)).free


def _has(needs: list[Need]) -> dict:
    places = sorted({need.where for need in needs if need.resource == "disk" and need.where})
    return {"disk_free": {where: _free(Path(where)) for where in places}, "memory_available": available_memory()}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 90:
        return f"~{seconds:.0f} s"
    return f"~{seconds / 60:.0f} min" if seconds < 5400 else f"~{seconds / 3600:.1f} h"


# -- smoke --


def smoke_checks(ctx: LayoutContext) -> list[Check]:
    """The smoke verdict the manifest records, or with `ctx.smoke` a new run of it."""
    if ctx.smoke:
        return [_run_smoke(ctx.path)]
    verdict = (ctx.manifest or {}).get("smoke")
    rerun = f"vlhub smoke {ctx.path} (or vlhub check --smoke)"
    if verdict is None:
        return [Check("smoke", "smoke test", WARN, "no verdict recorded", rerun)]
    if verdict.get("passed") is None:
        return [Check("smoke", "smoke test", WARN, unfinished_summary(verdict), rerun)]
    if not verdict["passed"]:
        failed = [f"{s['name']}: {s.get('detail', '')}" for s in verdict.get("stages", []) if not s.get("passed")]
        return [Check("smoke", "smoke test", FAIL, "recorded as failed: " + "; ".join(failed),
                      "convert again; vlhub smoke shows which stage differs")]
    figures = ", ".join(f"{name.replace('_', ' ')} {verdict[name]:.3g}" for name in ("max_abs_diff", "cosine")
                        if isinstance(verdict.get(name), float))
    return [Check("smoke", "smoke test", PASS, f"recorded as passed ({verdict.get('runtime')}, precision "
                  f"{verdict.get('precision')}{', ' + figures if figures else ''})")]


def _run_smoke(path: Path) -> Check:
    try:
        report = run_smoke(path)
    except UserError as exc:  # the runtime is missing, or the source is gone
        return Check("smoke", "smoke test (run now)", WARN, f"could not run: {exc}",
                     f"vlhub smoke {path} --against SRC")
    if not report.passed:
        failed = "; ".join(f"{s.name}: {s.detail}" for s in report.stages if not s.passed)
        return Check("smoke", "smoke test (run now)", FAIL, f"failed ({report.runtime}): {failed}",
                     "convert again; vlhub smoke shows which stage differs")
    return Check("smoke", "smoke test (run now)", PASS, f"passed ({report.runtime}, precision {report.precision}, "
                 f"{report.seconds:.1f} s)")


LAYOUT_GROUPS: tuple[Callable[[LayoutContext], list[Check]], ...] = (
    integrity_checks, weight_checks, number_checks, layout_toolchain_checks, layout_resource_checks, smoke_checks)


# ---------------------------------------------------------------------------------------------------------------------
# A catalog model before conversion


def check_model(name: str, *, target: str, images: Sequence[tuple[int, int]] = ()) -> Report:
    """What converting catalog model `name` to `target` (and compiling it) needs, and whether this machine has it."""
    spec = find_model(name)
    if spec is None:
        raise UserError(unknown_model_message(name))
    if target == "auto" or target not in TARGETS:
        raise UserError(f"--target {target!r}: a model that is not converted yet needs one of "
                        f"{', '.join(TARGETS[1:])}")
    report = Report("model", target, model=spec.name, family=spec.family.name)
    try:
        if target in LAYOUT_TARGETS:
            refuse_target(spec.family.name, target)
    except UserError as exc:
        report.checks.append(Check("route", "route", FAIL, str(exc), "choose another --target or model"))
        return report
    report.checks.append(Check("route", "route", PASS, f"{spec.family.name} converts to {target}"))
    cached = _cached_source(spec)
    report.checks.append(cached[0])
    report.checks += _model_numbers(spec, target, images)
    report.checks += toolchain_checks(target, spec.family.name)
    report.needs = model_needs(spec, target, downloaded=cached[1])
    report.checks += resource_checks(report.needs)
    report.has = _has(report.needs)
    return report


def _cached_source(spec: ModelSpec) -> tuple[Check, bool]:
    if spec.tiny:
        return Check("source", "source", PASS, "built in: generated locally on first use"), True
    from vlhub.hub.sources import cached_snapshot

    path = cached_snapshot(spec)
    if path is None:
        return Check("source", "source", WARN, f"{spec.hf_repo} is not on this machine: vlhub convert downloads it "
                     f"first ({format_size(spec.size_bytes)})", f"vlhub download {spec.name}"), False
    return Check("source", "source", PASS, f"downloaded: {path}"), True


def _model_numbers(spec: ModelSpec, target: str, images: Sequence[tuple[int, int]]) -> list[Check]:
    """The default options must hold for the model; with --image, the sizes that hold those images."""
    if target not in LAYOUT_TARGETS:
        if images:
            raise UserError(f"--image sizes compiled shapes, which only {', '.join(LAYOUT_TARGETS)} have")
        return []
    if images:
        try:
            plan = make_plan(spec.name, images=list(images), target=target)
        except UserError as exc:
            return [Check("numbers", "sizes for --image", FAIL, str(exc), "send smaller images, or lower max_pixels")]
        command = plan.command(target)
        if command is None:  # vamc: a visual N past what vlhub builds
            return [Check("numbers", "sizes for --image", FAIL, f"{target} cannot hold these images: visual N "
                          f"{plan.sizes.visual_patches}", "send smaller images, or lower max_pixels")]
        return [Check("numbers", "sizes for --image", PASS, _target_sizes(plan, target), f"convert with: {command}")]
    from vlhub.targets.registry import DEPLOYMENTS

    try:
        DEPLOYMENTS[target].check(spec.family.name, official_config(spec.config), "bfloat16", True)
    except UserError as exc:
        return [Check("numbers", "default options", FAIL, str(exc), "pass options that hold (vlhub plan MODEL)")]
    return [Check("numbers", "default options", PASS, f"vlhub convert {spec.name} --to {target}'s defaults hold")]


def _target_sizes(plan: SizePlan, target: str) -> str:
    """The compile sizes `plan` gives `target`'s layout, as its convert command sets them."""
    if target == "vamc" and plan.vamc:
        return (f"visual N {plan.vamc.visual_patches}, prefill {plan.vamc.prefill_length}, context "
                f"{plan.vamc.max_length}")
    if target == "tpu-mlir" and plan.tpu_mlir:
        width, height = plan.tpu_mlir.max_pixels
        return (f"max pixels {width},{height} ({plan.tpu_mlir.vision_patches} patches), seq length "
                f"{plan.tpu_mlir.seq_length}")
    return f"max seq len {plan.paddle_max_seq_len}"


def conversion_disk(target: str, spec: ModelSpec) -> int:
    """Bytes `vlhub convert --to target` writes: what each builder asks staged_directory for."""
    size = spec.size_bytes
    config = official_config(spec.config)
    if target == "paddle-inference":
        return 2 * size  # the weights, then the graphs' parameters
    if target == "vamc":
        return size + 2 * int(config["vocab_size"]) * int(config["hidden_size"])  # + embed_tokens.bin in float16
    return size


def model_needs(spec: ModelSpec, target: str, *, downloaded: bool) -> list[Need]:
    """Download, conversion, smoke test and the next step of `spec` to `target`, each with its source."""
    from huggingface_hub import constants

    needs = []
    size, params = spec.size_bytes, spec.params
    by_bytes = size / _7B_BYTES
    if not downloaded:
        needs += [Need("download", "disk", size, str(constants.HF_HUB_CACHE), "the catalog's bf16 size"),
                  Need("download", "time", None, None, "depends on the network")]
    out = str(vlhub_home() / "artifacts")
    largest = max(math.prod(shape) for _, shape in spec.family.official_tensors(spec.config))
    seconds_figure = "paddle_inference_seconds" if target == "paddle-inference" else "convert_seconds"
    needs += [Need("convert", "disk", conversion_disk(target, spec), out,
                   "what vlhub convert checks before writing"),
              Need("convert", "memory", 2 * 2 * largest, None,
                   "the largest tensor and its transposed copy; README Performance: 2.28 GB for 7B"),
              _scaled("convert", "time", seconds_figure, by_bytes)]
    if target == "paddle-inference":
        needs.append(_scaled("smoke", "time", "paddle_inference_smoke_seconds", by_bytes))
    else:
        needs += [_scaled("smoke", "memory", "smoke_memory", params / _7B_PARAMS),
                  _scaled("smoke", "time", "smoke_seconds", by_bytes)]
    return needs + next_step_needs(target, params, size, out)

