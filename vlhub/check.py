"""`vlhub check`: the pre-deployment checklist, for a layout vlhub wrote or for a catalog model before conversion.

    report = check_path(Path("./tiny-tpu"), target="auto", images=[(1280, 720)])
    report = check_model("qwen2-vl-7b", target=name)   # name: a target of vlhub.targets
    report.verdict, report.to_json()

Every check is a `Check` (group, name, status pass / warn / fail, detail, fix). A layout goes through the groups
in `LAYOUT_GROUPS`, each a function of a `LayoutContext`: integrity (manifest, recorded sha256, stray files), weights
(key layout, dtype, shapes against config.json, tied embeddings, a streamed NaN/Inf scan), numbers (the compiled
sizes against config.json and the --image sizes), toolchain, resources (disk and memory for the next step) and
smoke (the recorded verdict, or a new run). Resource estimates are `Need`s, each naming where its figure comes from.
What differs by target (its numbers, toolchain, dtype rules, needs) is the target's own
(vlhub/targets/<target>/check.py, through the registry); this module holds what every output shares."""

from __future__ import annotations

import shutil
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
from vlhub.convert.conversion import Model
from vlhub.convert.layouts import detect_family, detect_layout
from vlhub.convert.plan import KeyMapMismatch, plan_conversion
from vlhub.deploy.checks import CONVERT_MEMORY, FAIL, PASS, STATUSES, WARN, Check, LayoutContext, Need, scaled
from vlhub.deploy.target import Target
from vlhub.errors import UserError, VlhubError
from vlhub.formats.readers import Checkpoint, config_dtype, open_checkpoint
from vlhub.formats.registry import FORMATS, format_of_file
from vlhub.hub.home import vlhub_home
from vlhub.hub.store import manifest_problems, note_verified
from vlhub.keymaps import load_keymap
from vlhub.keymaps.config import tie_word_embeddings
from vlhub.manifest import MANIFEST, Manifest, unfinished_summary
from vlhub.plan import make_plan, refuse_target
from vlhub.smoke.run import available_memory, run_smoke
from vlhub.targets import TARGETS, checkpoint_target, layouts, recorded_target, smoke_runner
from vlhub.units import format_size, plural

AUTO = "auto"  # --target auto: the manifest's target, else the weights' format
_SCAN_BLOCK = 64 << 20  # bytes of one tensor the NaN/Inf scan holds at a time
_FAILS_WHEN_SHORT = ("download", "convert", "compile")  # steps that run here; "smoke", "serve" and "load" may not
_MEMORY_FIX = {"smoke": "convert with --no-smoke here, and smoke-test it on a machine with more memory",
               "serve": "serve it on a machine with more memory", "load": "load it on a machine with more memory"}


def check_targets() -> list[str]:
    """What `vlhub check --target` takes: auto, or a target of the registry."""
    return [AUTO, *TARGETS]


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


def check_path(path: Path, *, target: str = AUTO, images: Sequence[tuple[int, int]] = (),
               smoke: bool = False, say: Callable[[str], None] | None = None) -> Report:
    """Run every check that applies to the layout or converted checkpoint at `path`; `say` hears each group of
    checks as it starts (hashing every file and scanning every weight take minutes on a large model)."""
    if not path.is_dir():
        raise UserError(f"{path} is a file: vlhub check takes the directory vlhub convert wrote")
    manifest = Manifest.read(path)
    chosen = _resolve_target(path, target, manifest)
    if images and not chosen.is_layout:
        raise UserError(f"--image checks compiled sizes, which only {', '.join(t.name for t in layouts())} layouts "
                        f"have; a {chosen.name} checkpoint takes any size its processor allows")
    ctx = LayoutContext(path, chosen.name, manifest, _weights_folder(path, chosen, manifest), tuple(images), smoke)
    try:
        _open_weights(ctx)
        report = Report("layout", chosen.name, path=str(path), family=ctx.family, model=ctx.model_name)
        for step, group in LAYOUT_GROUPS:
            if say is not None:
                say(step)
            report.checks += group(ctx)
        report.needs = _next_needs(ctx)
        report.has = _has(report.needs)
    finally:
        if ctx.checkpoint is not None:
            ctx.checkpoint.close()
    return report


def _resolve_target(path: Path, target: str, manifest: Manifest | None) -> Target:
    """`auto`: the manifest's target, else the weights' format; a given target must agree with them."""
    if target != AUTO and target not in TARGETS:
        raise UserError(f"--target {target!r}: choose one of {', '.join(check_targets())}")
    wanted = TARGETS.get(target)  # None: auto
    if manifest is None and wanted is not None and wanted.is_layout:
        return wanted  # a layout that lost its manifest: the integrity checks say so
    if manifest is not None:
        found = recorded_target(manifest)
    else:
        found = _layout_by_shape(path)
        if found is None:
            with open_checkpoint(path) as checkpoint:  # headers only; no checkpoint here is bad input
                found = checkpoint_target(checkpoint.format.name)
        elif wanted is None:
            return found
    if wanted is None:
        if found is None:
            raise UserError(f"{path}: its {MANIFEST} names no target; pass --target")
        return found
    if found is not None and not found.is_layout and wanted.reads_plain_weights \
            and wanted.output.formats() & found.output.formats():
        return wanted  # plain weights checked as what the layout's loaders read (the key layout check says)
    if found is not None and found is not wanted:
        kind = "layout" if found.is_layout else "checkpoint"
        raise UserError(f"{path} is a {found.name} {kind}, not {wanted.name}: pass --target {found.name} or leave "
                        "--target out")
    return wanted


def _layout_by_shape(path: Path) -> Target | None:
    """The layout target whose builder writes what `path` holds (for a layout whose manifest is gone)."""
    return next((t for t in layouts() if all(any(path.glob(mark)) for mark in t.marks)), None)


def _weights_folder(path: Path, target: Target, manifest: Manifest | None) -> Path:
    """The folder a runtime loads the weights from: the manifest's `target.weights`, else where the builder puts
    it, else the directory itself."""
    if manifest is not None and manifest.target.weights:
        return manifest.weights_dir(path)
    candidates = sorted(path.glob(target.weights_glob)) if target.weights_glob else [path]
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
    fmt = FORMATS[ctx.recorded.format or _weights_format(ctx)]
    listed = set(ctx.manifest.files if ctx.manifest else ())
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
        status = FAIL if TARGETS[ctx.target].is_layout else WARN
        return [Check("integrity", "manifest", status,
                      f"no readable {MANIFEST}: nothing records which files belong here or their sha256", convert),
                _stray_check(ctx)]
    files = ctx.manifest.files
    checks = [Check("integrity", "manifest", PASS,
                    f"{MANIFEST}: {plural(len(files), 'file')}, written by vlhub {ctx.manifest.vlhub_version} "
                    f"on {ctx.manifest.created}")]
    damaged = manifest_problems(ctx.path, ctx.manifest)
    note_verified(ctx.path, ctx.manifest, damaged)  # `vlhub cache ls` shows it, as after `vlhub cache verify`
    total = sum(entry.size for entry in files.values())
    if damaged:
        checks.append(Check("integrity", "file hashes", FAIL,
                            f"{len(damaged)} of {plural(len(files), 'file')} differ{'s' if len(damaged) == 1 else ''} "
                            f"from the manifest: {'; '.join(damaged)}",
                            convert))
    else:
        checks.append(Check("integrity", "file hashes", PASS,
                            f"{plural(len(files), 'file')} ({format_size(total)}): sizes and sha256 as recorded"))
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
    listed = set(ctx.manifest.files) | {MANIFEST}
    vendor = set(TARGETS[ctx.target].vendor_files(ctx.family)) if ctx.family else set()
    stray_weights, unlisted = [], []
    for file in sorted(p for p in ctx.path.rglob("*") if p.is_file()):
        name = file.relative_to(ctx.path).as_posix()
        if name in listed or name.split("/")[0] in TARGETS[ctx.target].compile_outputs or file.name.startswith("."):
            continue
        in_weights = file.parent == ctx.weights
        if in_weights and file.name in vendor:
            continue
        if in_weights and (format_of_file(file.name) or file.name.endswith(".index.json")):
            stray_weights.append(name)
        else:
            unlisted.append(name)
    if stray_weights:
        paddle = _weights_format(ctx) == "pdparams"
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
    return TARGETS[target].output.layout_in(load_keymap(family))


def _weights_format(ctx: LayoutContext) -> str:
    """The file format the target's loader reads for this family (its only one when the family is unknown)."""
    output = TARGETS[ctx.target].output
    if ctx.family is not None:
        return output.format_in(load_keymap(ctx.family))
    return output.format or sorted(output.formats())[0]


def _layout_check(ctx: LayoutContext) -> Check:
    assert ctx.checkpoint is not None
    fmt = _weights_format(ctx)
    if ctx.family is None:
        return Check("weights", "key layout", FAIL, "the keys are no Qwen-VL family model's",
                     "check config.json's model_type and the weights")
    wanted = expected_layout(ctx.target, ctx.family)
    problems = []
    if ctx.checkpoint.format.name != fmt:
        problems.append(f"the weights are {ctx.checkpoint.format.name}, {ctx.target} loads {fmt}")
    layouts = load_keymap(ctx.family).layouts
    if ctx.layout not in layouts or not layouts[ctx.layout].stores_like(layouts[wanted]):
        problems.append(f"the keys are in the {ctx.layout} layout, {ctx.target}'s loader reads {wanted}")
    problems += ctx.plan_problems.get("unreadable", [])
    for kind in ("unmatched", "ambiguous"):
        if ctx.plan_problems.get(kind):
            names = ctx.plan_problems[kind]
            problems.append(f"{plural(len(names), kind + ' key')} ({', '.join(names[:3])})")
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
                     f"{plural(stored['uint16'], 'tensor')} {'is' if stored['uint16'] == 1 else 'are'} stored as "
                     "uint16 (how Paddle stores bfloat16) but config.json "
                     f"says {declared}: a loader reads the bf16 bits as numbers (1.0 becomes 16256.0)",
                     "if they are bfloat16, say dtype bfloat16 in config.json; else " + convert)
    if declared is None:
        return Check("weights", "dtype", WARN, f"config.json declares no dtype (the tensors are {shown}): loaders "
                     "then load float32", "set torch_dtype (Hugging Face) or dtype (Paddle) in config.json")
    if declared != majority:
        return Check("weights", "dtype", FAIL, f"config.json says {declared}, the tensors are {shown}: a loader "
                     "allocates the one and reads the other", convert)
    own = TARGETS[ctx.target].dtype_check(ctx, majority)
    if own is not None:
        return own
    return Check("weights", "dtype", PASS, f"{shown}; config.json says {declared}")


def _shape_check(ctx: LayoutContext) -> Check:
    assert ctx.config is not None
    missing = [f"{name} missing" for name in ctx.plan_problems.get("missing", [])]
    wrong = ctx.plan_problems.get("mis-shaped", []) + missing
    dims = ", ".join(f"{key} {ctx.config.get(key)}" for key in ("hidden_size", "num_hidden_layers", "vocab_size")
                     if key in ctx.config)
    if wrong:
        return Check("weights", "shapes", FAIL, f"{plural(len(wrong), 'tensor')} disagree"
                     f"{'s' if len(wrong) == 1 else ''} with config.json ({dims}): "
                     f"{'; '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''}",
                     "put the model's own config.json beside the weights, or convert again")
    if "unreadable" in ctx.plan_problems:
        return Check("weights", "shapes", WARN, "not compared: the keys are in no layout vlhub knows")
    assert ctx.checkpoint is not None
    return Check("weights", "shapes", PASS,
                 f"{plural(len(ctx.checkpoint.tensors), 'tensor')} as config.json says ({dims})")


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
        return Check("weights", "NaN/Inf", FAIL,
                     f"{sum(found.values())} NaN or Inf values in {plural(len(found), 'tensor')} "
                     f"({listed}{' ...' if len(found) > 4 else ''})",
                     "the source or the conversion is broken: check the source with vlhub check, then convert again")
    return Check("weights", "NaN/Inf", PASS, f"none in {format_size(scanned)} of weights (scanned in {seconds:.1f} s)")


def _non_finite(block: np.ndarray, dtype: str) -> int:
    if dtype == "bfloat16":  # uint16 bits: the exponent all ones is Inf or NaN
        return int(np.count_nonzero((block & 0x7F80) == 0x7F80))
    return int(block.size - np.count_nonzero(np.isfinite(block)))


# -- numbers --


def number_checks(ctx: LayoutContext) -> list[Check]:
    """The layout's compiled sizes against config.json, and against every --image (the target's own checks)."""
    if not TARGETS[ctx.target].is_layout or ctx.config is None or ctx.manifest is None:
        return []
    if ctx.recorded.name != ctx.target:  # weights without the layout around them: nothing compiled
        return []
    try:
        return TARGETS[ctx.target].number_checks(ctx)
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as exc:
        return [Check("numbers", "compile sizes", FAIL, f"the layout's numbers cannot be read ({exc!r})",
                      ctx.reconvert())]


# -- toolchain --


def layout_toolchain_checks(ctx: LayoutContext) -> list[Check]:
    """What the next step needs installed here (the target's own list)."""
    return TARGETS[ctx.target].toolchain_checks(ctx.family, ctx.weights)


def layout_resource_checks(ctx: LayoutContext) -> list[Check]:
    return resource_checks(_next_needs(ctx))


# -- resources --


def _next_needs(ctx: LayoutContext) -> list[Need]:
    """What the step after this layout takes (nothing to estimate from when the weights cannot be read)."""
    if ctx.params is None or ctx.model_bytes is None:
        return []
    return TARGETS[ctx.target].next_needs(ctx.params, ctx.model_bytes, str(ctx.path))


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
    verdict = ctx.manifest.smoke if ctx.manifest else None
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
        report = run_smoke(smoke_runner(path))
    except UserError as exc:  # the runtime is missing, or the source is gone
        return Check("smoke", "smoke test (run now)", WARN, f"could not run: {exc}",
                     f"vlhub smoke {path} --against SRC")
    if not report.passed:
        failed = "; ".join(f"{s.name}: {s.detail}" for s in report.stages if not s.passed)
        return Check("smoke", "smoke test (run now)", FAIL, f"failed ({report.runtime}): {failed}",
                     "convert again; vlhub smoke shows which stage differs")
    return Check("smoke", "smoke test (run now)", PASS, f"passed ({report.runtime}, precision {report.precision}, "
                 f"{report.seconds:.1f} s)")


# each group of checks, with what it does in a few words (what `check_path` tells its `say` as the group starts)
LAYOUT_GROUPS: tuple[tuple[str, Callable[[LayoutContext], list[Check]]], ...] = (
    ("hashing the files", integrity_checks), ("reading the weights (NaN/Inf scan)", weight_checks),
    ("the numbers", number_checks), ("the toolchain", layout_toolchain_checks),
    ("disk and memory", layout_resource_checks), ("the smoke test", smoke_checks))


# ---------------------------------------------------------------------------------------------------------------------
# A catalog model before conversion


def check_model(name: str, *, target: str, images: Sequence[tuple[int, int]] = ()) -> Report:
    """What converting catalog model `name` to `target` (and compiling it) needs, and whether this machine has it."""
    spec = find_model(name)
    if spec is None:
        raise UserError(unknown_model_message(name))
    if target not in TARGETS:
        raise UserError(f"--target {target!r}: a model that is not converted yet needs one of "
                        f"{', '.join(TARGETS)}")
    chosen = TARGETS[target]
    report = Report("model", target, model=spec.name, family=spec.family.name)
    try:
        if chosen.is_layout:
            refuse_target(spec.family, target, spec.config.get("model_type"))
    except UserError as exc:
        report.checks.append(Check("route", "route", FAIL, str(exc), "choose another --target or model"))
        return report
    report.checks.append(Check("route", "route", PASS, f"{spec.family.name} converts to {target}"))
    cached = _cached_source(spec)
    report.checks.append(cached[0])
    report.checks += _model_numbers(spec, chosen, images)
    report.checks += chosen.toolchain_checks(spec.family.name, None)
    report.needs = model_needs(spec, chosen, downloaded=cached[1])
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


def _model_numbers(spec: ModelSpec, target: Target, images: Sequence[tuple[int, int]]) -> list[Check]:
    """The default options must hold for the model; with --image, the sizes that hold those images."""
    if not target.is_layout:
        if images:
            raise UserError(f"--image sizes compiled shapes, which only {', '.join(t.name for t in layouts())} have")
        return []
    if images:
        try:
            plan = make_plan(spec.name, images=list(images), target=target.name)
        except UserError as exc:
            return [Check("numbers", "sizes for --image", FAIL, str(exc), "send smaller images, or lower max_pixels")]
        command = plan.command(target.name)
        if command is None:  # a size past what vlhub builds
            return [Check("numbers", "sizes for --image", FAIL, f"{target.name} cannot hold these images: visual N "
                          f"{plan.sizes.visual_patches}", "send smaller images, or lower max_pixels")]
        return [Check("numbers", "sizes for --image", PASS, plan.targets[target.name].summary(),
                      f"convert with: {command}")]
    model = Model(spec.family, official_config(spec.config), "bfloat16")
    try:
        target.require(target.settle(target.options(), model, smoke=True))
    except UserError as exc:
        return [Check("numbers", "default options", FAIL, str(exc), "pass options that hold (vlhub plan MODEL)")]
    return [Check("numbers", "default options", PASS, f"vlhub convert {spec.name} --to {target.name}'s defaults hold")]


def model_needs(spec: ModelSpec, target: Target, *, downloaded: bool) -> list[Need]:
    """Download, conversion, smoke test and the next step of `spec` to `target`, each with its source."""
    from huggingface_hub import constants

    needs = []
    size, params = spec.size_bytes, spec.params
    if not downloaded:
        needs += [Need("download", "disk", size, str(constants.HF_HUB_CACHE), "the catalog's bf16 size"),
                  Need("download", "time", None, None, "depends on the network")]
    out = str(vlhub_home() / "artifacts")
    needs += [Need("convert", "disk", target.written_bytes(size, official_config(spec.config)), out,
                   "what vlhub convert checks before writing"),
              scaled("convert", "memory", CONVERT_MEMORY, 1.0)]
    return needs + target.build_needs(params, size) + target.next_needs(params, size, out)
