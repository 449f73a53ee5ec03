"""`vlhub convert`: any supported checkpoint to Paddle (PaddleMIX), safetensors or torch, or into a deployment
layout (Paddle Inference, TPU-MLIR, vamc), streaming, then smoke-tested.

Examples:
    vlhub convert tiny-qwen2-vl --to paddle                  # into the cache: vlhub cache path tiny-qwen2-vl --target paddle
    vlhub convert qwen2-vl-7b --to paddle-inference          # downloads the model first when it is not cached
    vlhub convert ./Qwen2-VL-7B-Instruct --to paddle --out ./Qwen2-VL-7B-Instruct-paddle
    vlhub convert ./Qwen2-VL-7B-Instruct-paddle --to safetensors --dtype bfloat16
    vlhub convert qwen2.5-vl-72b --to paddle --dry-run
    vlhub convert tiny-qwen-vl --to paddle-inference --ir legacy
    vlhub convert tiny-qwen2-vl --to tpu-mlir --onnx --seq-length 128 --max-pixels 168,112
    vlhub convert tiny-qwen2.5-vl --to vamc --image 1280x720
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from vlhub.catalog import ModelSpec, find_model
from vlhub.cli._errors import reports_errors
from vlhub.cli._options import JsonOpt, SourceArg
from vlhub.cli._output import byte_progress, print_json, stderr, stdout
from vlhub.cli.download import download_for
from vlhub.cli.smoke import TpuMlirPythonOpt, failure_summary, show_report, smoke_status
from vlhub.convert.configs import official_config
from vlhub.convert.conversion import TARGETS, Conversion, plan_json, plan_table_rows, prepare_conversion
from vlhub.errors import CheckFailed, UserError, VlhubError
from vlhub.hub.sources import cached_snapshot
from vlhub.hub.store import mark_used, reusable_artifact
from vlhub.smoke.run import DEFAULT_TOKENS, RuntimeMissing, checkpoint_smoke_input, record_verdict, run_smoke
from vlhub.smoke.verdict import ERRORED, INTERRUPTED, NOT_RUN, RUNNING, SKIPPED, SmokeReport, unfinished_verdict
from vlhub.targets.base import Deployment
from vlhub.targets.paddle_inference.build import DEFAULT_MAX_SEQ_LEN
from vlhub.targets.registry import DEPLOYMENTS
from vlhub.targets.tpu_mlir.build import DEFAULT_GROUP_SIZE, DEFAULT_SEQ_LENGTH, QUANTIZE_DTYPE
from vlhub.targets.vamc.build import DEFAULT_MAX_PIXELS as VAMC_MAX_PIXELS
from vlhub.units import format_size, parse_size

ToOpt = Annotated[str, typer.Option("--to", help=f"Target format: {', '.join(TARGETS)}.", show_default=False)]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Output directory (default: beside the source, named after --to).")]
DtypeOpt = Annotated[
    str | None,
    typer.Option("--dtype", help="Cast floating tensors: bfloat16, float16 or float32 (default: keep each tensor's dtype)."),
]
ShardOpt = Annotated[
    str | None, typer.Option("--max-shard-size", help="Largest shard, e.g. 5GB or 2GiB (default: 5GB safetensors, 10GB pdparams and torch).")
]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the plan and write nothing.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output directory.")]
IrOpt = Annotated[str | None, typer.Option(
    "--ir", help="paddle-inference graphs: pir (.json, Paddle 3's) or legacy (.pdmodel, which PaddleMIX's Qwen-VL "
                 "static predictor opens); default legacy for Qwen-VL, pir for Qwen2-VL and Qwen2.5-VL.",
    show_default=False)]
MaxSeqLenOpt = Annotated[int | None, typer.Option(
    "--max-seq-len", help=f"paddle-inference: the longest prompt plus generation the layout is for (default "
                          f"{DEFAULT_MAX_SEQ_LEN}).", show_default=False)]
SeqLengthOpt = Annotated[int | None, typer.Option(
    "--seq-length", help=f"tpu-mlir: positions for the prompt, image and answer (default {DEFAULT_SEQ_LENGTH}).",
    show_default=False)]
MaxPixelsOpt = Annotated[str | None, typer.Option(
    "--max-pixels", help="The largest image. tpu-mlir: W,H in multiples of 28 (default 756,756 for Qwen2-VL, "
                         f"672,896 for Qwen2.5-VL). vamc: a pixel count (default {VAMC_MAX_PIXELS}).",
    show_default=False)]
QuantizeOpt = Annotated[str | None, typer.Option(
    "--quantize", help=f"tpu-mlir: {', '.join(QUANTIZE_DTYPE)} (default w4bf16, or w4f16 for a float16 model).",
    show_default=False)]
GroupSizeOpt = Annotated[int | None, typer.Option(
    "--group-size", help=f"tpu-mlir: weights per quantization group for w4/w8 (default {DEFAULT_GROUP_SIZE}).",
    show_default=False)]
OnnxOpt = Annotated[bool, typer.Option(
    "--onnx", help="tpu-mlir: also export the older flow's ONNX networks (sophon-demo), one layer at a time, with "
                   "compile_onnx.sh; the smoke test then runs them in onnxruntime.")]
ChipOpt = Annotated[str | None, typer.Option("--chip", help="tpu-mlir: bm1684x (default) or bm1688.",
                                             show_default=False)]
ImageOpt = Annotated[list[str] | None, typer.Option(
    "--image", metavar="WxH", help="vamc: an image size you will send (repeatable); the visual N is planned to hold "
                                   "the largest (instead of --max-pixels).", show_default=False)]
PrefillLenOpt = Annotated[int | None, typer.Option(
    "--prefill-len", help="vamc: the LLM's prefill length, a multiple of 16 (default: the image's tokens plus a "
                          "prompt, as `vlhub plan` computes).", show_default=False)]
MaxLenOpt = Annotated[int | None, typer.Option(
    "--max-len", help="vamc: the LLM's context (KV cache) length, a multiple of 16 (default: computed).",
    show_default=False)]
TpOpt = Annotated[int | None, typer.Option(
    "--tp", help="vamc: tensor parallelism, dies per LLM; divides the KV heads (default 4 where it does).",
    show_default=False)]
NoSmokeOpt = Annotated[bool, typer.Option("--no-smoke", help="Skip the smoke test that runs the converted model.")]
TokensOpt = Annotated[int, typer.Option("--tokens", min=1, help="Tokens the smoke test generates.")]
# what converting into a checkpoint format (no deployment layout) takes
_CHECKPOINT_OPTIONS = ("dtype", "max_shard_size", "allow_unmatched")
UnmatchedOpt = Annotated[
    bool, typer.Option("--allow-unmatched", help="Pass tensors the key map does not know through unchanged.")
]


@reports_errors
def convert(
    source: SourceArg,
    to: ToOpt,
    out: OutOpt = None,
    dtype: DtypeOpt = None,
    max_shard_size: ShardOpt = None,
    dry_run: DryRunOpt = False,
    overwrite: OverwriteOpt = False,
    allow_unmatched: UnmatchedOpt = False,
    ir: IrOpt = None,
    max_seq_len: MaxSeqLenOpt = None,
    seq_length: SeqLengthOpt = None,
    max_pixels: MaxPixelsOpt = None,
    quantize: QuantizeOpt = None,
    group_size: GroupSizeOpt = None,
    chip: ChipOpt = None,
    onnx: OnnxOpt = False,
    image: ImageOpt = None,
    prefill_len: PrefillLenOpt = None,
    max_len: MaxLenOpt = None,
    tp: TpOpt = None,
    no_smoke: NoSmokeOpt = False,
    tpu_mlir_python: TpuMlirPythonOpt = None,
    tokens: TokensOpt = DEFAULT_TOKENS,
    json: JsonOpt = False,
) -> None:
    """Convert a checkpoint tensor by tensor: keys through the family's key map, Linear weights transposed
    where the target stores them \\[in, out], dtypes cast only when asked. Nothing is left behind on error.
    Then a smoke test runs the converted model against the source (see `vlhub smoke`): a failure exits 1
    and is recorded in the output's manifest. Without --out a catalog model (downloaded first if need be)
    is converted into the cache, $VLHUB_HOME/artifacts/, and the same command again answers from there."""
    given = {"dtype": dtype, "max_shard_size": max_shard_size, "allow_unmatched": allow_unmatched or None, "ir": ir,
             "max_seq_len": max_seq_len, "seq_length": seq_length, "max_pixels": max_pixels, "quantize": quantize,
             "group_size": group_size, "chip": chip, "onnx": onnx or None, "image": image or None,
             "prefill_len": prefill_len, "max_len": max_len, "tp": tp}
    deployment = DEPLOYMENTS.get(to)
    options = _options_for(to, {name: value for name, value in given.items() if value is not None})
    smoke = not no_smoke
    if tpu_mlir_python and (to != "tpu-mlir" or no_smoke):
        raise UserError("--tpu-mlir-python runs the smoke test's simulator stage of --to tpu-mlir: drop it here")
    if deployment is not None:
        _deploy(deployment, source, out, options, dry_run=dry_run, overwrite=overwrite, smoke=smoke, tokens=tokens,
                as_json=json, tpu_mlir_python=tpu_mlir_python)
        return
    shard_limit = parse_size(max_shard_size) if max_shard_size else None
    if not dry_run:
        _download_if_missing(source, to=to, dtype=dtype)
    conversion = prepare_conversion(source, to=to, dtype=dtype, allow_unmatched=allow_unmatched, dry_run=dry_run)
    if dry_run:
        _show_plan(conversion, json)
        return
    if smoke:
        _check_smoke_input(conversion)
    if out is None and conversion.model is not None and not overwrite:
        cached = conversion.default_out(shard_limit)
        if _answer_from_cache(cached, conversion, smoke=smoke, tokens=tokens, as_json=json):
            return
        overwrite = cached.exists()  # an interrupted or damaged copy in the cache: make it again
    with byte_progress(f"converting to {to}", conversion.plan.total_bytes) as advance:
        result = conversion.write(out, overwrite=overwrite, max_shard_size=shard_limit, on_bytes=advance)
    report = _smoke(result.out, conversion, tokens) if smoke else _skip_smoke(result.out)
    if json:
        print_json({"out": str(result.out), **plan_json(conversion.plan), "files": result.manifest["files"],
                    "smoke": report.as_dict() if report else None, "cached": False})
    else:
        ops = ", ".join(f"{op} x{n}" for op, n in conversion.plan.op_counts.items()) or "copy only"
        stdout.print(f"{escape(str(result.out))}  ({len(conversion.plan.steps)} tensors, "
                     f"{format_size(conversion.plan.total_bytes)}; {ops})")
    _conclude(result.out, report, json)


def _options_for(to: str, given: dict[str, object]) -> dict[str, object]:
    """The options `to` takes, refusing any given option that belongs to other targets."""
    def accepted(target: str) -> tuple[str, ...]:
        return DEPLOYMENTS[target].options if target in DEPLOYMENTS else _CHECKPOINT_OPTIONS

    for name in given:
        if to in TARGETS and name not in accepted(to):
            takers = [target for target in TARGETS if name in accepted(target)]
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} does not apply to --to {to} (it applies to --to {', '.join(takers)}): drop {flag}")
    return dict(given)


def _deploy(deployment: Deployment, source: str, out: Path | None, options: dict, *, dry_run: bool, overwrite: bool,
            smoke: bool, tokens: int, as_json: bool, tpu_mlir_python: str | None) -> None:
    """Build a deployment layout (or answer from the cache), then smoke-test it."""
    if not dry_run:
        spec = find_model(source)
        if _needs_download(source, spec):
            assert spec is not None
            prepare_conversion(source, to=deployment.name, dry_run=True)
            deployment.check(spec.family.name, spec.config, "bfloat16", smoke, **options)
            download_for(spec)
    conversion = prepare_conversion(source, to=deployment.name, dtype=options.get("dtype"), dry_run=dry_run)
    if dry_run:
        _show_plan(conversion, as_json)
        return
    if conversion.checkpoint is not None:  # the layout plans its own conversion
        conversion.checkpoint.close()
    deployment.check(conversion.plan.family, official_config(conversion.config), conversion.output_dtype(), smoke,
                     **options)
    if smoke:
        _check_smoke_input(conversion)
    if out is None and conversion.model is not None and not overwrite:
        cached = deployment.output(conversion, **options)
        if _answer_from_cache(cached, conversion, smoke=smoke, tokens=tokens, as_json=as_json,
                              tpu_mlir_python=tpu_mlir_python):
            return
        overwrite = cached.exists()
    label, total = deployment.progress(conversion, **options)
    with byte_progress(label, total) as advance:
        layout = deployment.build(source, out, overwrite=overwrite, on_bytes=advance, **options)
    report = _smoke(layout.out, conversion, tokens, tpu_mlir_python) if smoke else _skip_smoke(layout.out)
    target = layout.manifest["target"]
    if as_json:
        print_json({**_layout_json(layout.out, layout.manifest), "smoke": report.as_dict() if report else None,
                    "cached": False})
    else:
        stdout.print(f"{escape(str(layout.out))}  ({escape(deployment.summary.format(weights=target['weights']))})")
    _conclude(layout.out, report, as_json)


def _layout_json(out: Path, manifest: dict) -> dict:
    """A layout's --json fields: where it is, its weight folder and static graphs, its target and files."""
    fields = {"out": str(out), "weights": str(out / manifest["target"]["weights"])}
    if "graphs" in manifest:
        fields["graphs"] = manifest["graphs"]
    return {**fields, "target": manifest["target"], "files": manifest["files"]}


def _conclude(out: Path, report: SmokeReport | None, as_json: bool) -> None:
    """Show the smoke report; a failed one exits 1."""
    if report and not as_json:
        show_report(report, False)
    if report and not report.passed:
        raise CheckFailed(f"{out} fails its smoke test: {failure_summary(report)}")


def _answer_from_cache(cached: Path, conversion: Conversion, *, smoke: bool, tokens: int, as_json: bool,
                       tpu_mlir_python: str | None = None) -> bool:
    """The same conversion of the same revision is in the cache: answer with it (smoke-testing it if that was
    skipped when it was made) and say so; False when there is none to reuse."""
    manifest = reusable_artifact(cached)
    if manifest is None:
        return False
    if conversion.checkpoint is not None:
        conversion.checkpoint.close()
    mark_used(cached)
    verdict = manifest.get("smoke")
    if smoke and (verdict is None or verdict.get("passed") is None or tpu_mlir_python):
        report = _smoke(cached, conversion, tokens, tpu_mlir_python)
        verdict = report.as_dict() if report else verdict
    if as_json:
        shape = _layout_json(cached, manifest) if conversion.to in DEPLOYMENTS else plan_json(conversion.plan)
        print_json({"out": str(cached), **shape, "files": manifest.get("files"), "smoke": verdict, "cached": True})
    else:
        stdout.print(f"{escape(str(cached))}  (cached; --overwrite converts again)")
    if verdict and verdict.get("passed") is False:
        raise CheckFailed(f"the cached conversion at {cached} failed its smoke test; --overwrite converts again")
    return True


def _needs_download(source: str, spec: ModelSpec | None) -> bool:
    """A catalog model that is not on this machine yet (and is not a built-in tiny one)."""
    return (spec is not None and not spec.tiny and not Path(source).expanduser().exists()
            and cached_snapshot(spec) is None)


def _download_if_missing(source: str, *, to: str, dtype: str | None) -> None:
    """One command from a catalog name to a conversion: fetch the model first when it is not here, once the
    options are known to be good (planned from the catalog, no data needed)."""
    spec = find_model(source)
    if _needs_download(source, spec):
        assert spec is not None
        prepare_conversion(source, to=to, dtype=dtype, dry_run=True)
        download_for(spec)


def _smoke(out: Path, conversion: Conversion, tokens: int,
           tpu_mlir_python: str | None = None) -> SmokeReport | None:
    """Smoke-test a fresh conversion against its source and record the verdict in its manifest, whatever
    happens: a test that is interrupted, stops on an error or is killed leaves that in the manifest (`vlhub check`
    reports it), never an output that looks converted without one."""
    record_verdict(out, unfinished_verdict(RUNNING))
    try:
        with smoke_status() as status:
            report = run_smoke(out, against=str(conversion.source_path), tokens=tokens, status=status,
                               tpu_mlir_python=tpu_mlir_python)
    except RuntimeMissing as exc:
        stderr.print(f"warning: smoke test not run: {exc}", markup=False)
        record_verdict(out, unfinished_verdict(NOT_RUN, str(exc)))
        return None
    except KeyboardInterrupt:
        record_verdict(out, unfinished_verdict(INTERRUPTED))
        stderr.print(f"{out} is converted; its smoke test was interrupted: vlhub smoke {out} runs it", markup=False)
        raise
    except Exception as exc:
        reason = str(exc) if isinstance(exc, VlhubError) else f"{type(exc).__name__}: {exc}"
        record_verdict(out, unfinished_verdict(ERRORED, " ".join(reason.split())))
        stderr.print(f"{out} is converted; its smoke test stopped on an error, recorded in its manifest",
                     markup=False)
        raise
    record_verdict(out, report.as_dict())
    return report


def _skip_smoke(out: Path) -> None:
    """Record that the conversion at `out` was made with --no-smoke."""
    record_verdict(out, unfinished_verdict(SKIPPED))


def _check_smoke_input(conversion: Conversion) -> None:
    """Refuse, before anything is written, a checkpoint the smoke test cannot make a prompt for (a special
    token id outside its vocabulary, say): the test would otherwise fail only after the conversion."""
    if conversion.checkpoint is not None:
        checkpoint_smoke_input(conversion.checkpoint.root, conversion.config)


def _show_plan(conversion: Conversion, as_json: bool) -> None:
    plan = conversion.plan
    if as_json:
        print_json(plan_json(plan))
        return
    table = Table("source", "target", "shape", "ops", "bytes", box=None,
                  title=f"{plan.family}: {plan.source_layout} -> {plan.target_layout} ({conversion.target_format})")
    for source, target, before, after, ops, nbytes in plan_table_rows(plan):
        shape = before if before == after else f"{before} -> {after}"
        table.add_row(escape(source), escape(target) if target != source else "=", shape, ops, format_size(nbytes))
    stdout.print(table)
    ops = ", ".join(f"{op} x{n}" for op, n in plan.op_counts.items()) or "copy only"
    stdout.print(f"{len(plan.steps)} tensors, {format_size(plan.total_bytes)}; {ops}; nothing written (--dry-run)")
