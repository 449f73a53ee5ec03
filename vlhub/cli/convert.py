"""`vlhub convert`: any supported checkpoint to Paddle (PaddleMIX), safetensors, torch or a Paddle Inference
deployment, streaming, then smoke-tested.

Examples:
    vlhub convert tiny-qwen2-vl --to paddle                  # into the cache: vlhub cache path tiny-qwen2-vl --target paddle
    vlhub convert qwen2-vl-7b --to paddle-inference          # downloads the model first when it is not cached
    vlhub convert ./Qwen2-VL-7B-Instruct --to paddle --out ./Qwen2-VL-7B-Instruct-paddle
    vlhub convert ./Qwen2-VL-7B-Instruct-paddle --to safetensors --dtype bfloat16
    vlhub convert qwen2.5-vl-72b --to paddle --dry-run
    vlhub convert tiny-qwen-vl --to paddle-inference --ir legacy
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from vlhub.cache.paddle_inference import (
    DEFAULT_MAX_SEQ_LEN,
    build_paddle_inference,
    check_layout_options,
    layout_output,
)
from vlhub.cache.store import mark_used, reusable_artifact
from vlhub.cache.tpu_mlir import (
    DEFAULT_GROUP_SIZE,
    DEFAULT_SEQ_LENGTH,
    QUANTIZE_DTYPE,
    build_tpu_mlir,
    check_smoke_image_fits,
    tpu_layout_output,
    tpu_options,
)
from vlhub.catalog import find_model
from vlhub.cli._errors import reports_errors
from vlhub.cli._options import JsonOpt, SourceArg
from vlhub.cli._output import byte_progress, print_json, stderr, stdout
from vlhub.cli.download import download_for
from vlhub.cli.smoke import failure_summary, show_report, smoke_status
from vlhub.configs import official_config
from vlhub.convert import TARGETS, Conversion, plan_json, plan_table_rows, prepare_conversion
from vlhub.errors import CheckFailed, UserError
from vlhub.smoke.run import DEFAULT_TOKENS, RuntimeMissing, record_verdict, run_smoke
from vlhub.smoke.verdict import SmokeReport
from vlhub.sources import cached_snapshot
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
IrOpt = Annotated[
    str, typer.Option("--ir", help="paddle-inference graphs: pir (.json, Paddle 3's default) or legacy (.pdmodel, "
                                   "which PaddleMIX's static predictor expects).")
]
MaxSeqLenOpt = Annotated[
    int, typer.Option("--max-seq-len", help="paddle-inference: the longest prompt plus generation the layout is for.")
]
SeqLengthOpt = Annotated[int | None, typer.Option(
    "--seq-length", help=f"tpu-mlir: positions for the prompt, image and answer (default {DEFAULT_SEQ_LENGTH}).",
    show_default=False)]
MaxPixelsOpt = Annotated[str | None, typer.Option(
    "--max-pixels", metavar="W,H", help="tpu-mlir: the largest image, multiples of 28 (default: 756,756 for Qwen2-VL, "
                                        "672,896 for Qwen2.5-VL).", show_default=False)]
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
NoSmokeOpt = Annotated[bool, typer.Option("--no-smoke", help="Skip the smoke test that runs the converted model.")]
TokensOpt = Annotated[int, typer.Option("--tokens", min=1, help="Tokens the smoke test generates.")]
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
    ir: IrOpt = "pir",
    max_seq_len: MaxSeqLenOpt = DEFAULT_MAX_SEQ_LEN,
    seq_length: SeqLengthOpt = None,
    max_pixels: MaxPixelsOpt = None,
    quantize: QuantizeOpt = None,
    group_size: GroupSizeOpt = None,
    chip: ChipOpt = None,
    onnx: OnnxOpt = False,
    no_smoke: NoSmokeOpt = False,
    tokens: TokensOpt = DEFAULT_TOKENS,
    json: JsonOpt = False,
) -> None:
    """Convert a checkpoint tensor by tensor: keys through the family's key map, Linear weights transposed
    where the target stores them \\[in, out], dtypes cast only when asked. Nothing is left behind on error.
    Then a smoke test runs the converted model against the source (see `vlhub smoke`): a failure exits 1
    and is recorded in the output's manifest. Without --out a catalog model (downloaded first if need be)
    is converted into the cache, $VLHUB_HOME/artifacts/, and the same command again answers from there."""
    shard_limit = parse_size(max_shard_size) if max_shard_size else None
    if to != "paddle-inference" and (ir != "pir" or max_seq_len != DEFAULT_MAX_SEQ_LEN):
        raise UserError("--ir and --max-seq-len apply to --to paddle-inference only")
    given = {"seq_length": seq_length, "max_pixels": max_pixels, "quantize": quantize, "group_size": group_size,
             "chip": chip}
    tpu = {name: value for name, value in given.items() if value is not None}
    if to != "tpu-mlir" and (tpu or onnx):
        raise UserError("--seq-length, --max-pixels, --quantize, --group-size, --chip and --onnx apply to --to "
                        "tpu-mlir only")
    if to == "tpu-mlir" and (dtype or max_shard_size):
        raise UserError("--to tpu-mlir writes the dtype --quantize needs, in llm_convert's shards: drop --dtype "
                        "and --max-shard-size")
    if not dry_run:
        _download_if_missing(source, to=to, dtype=dtype, ir=ir, max_seq_len=max_seq_len, tpu=tpu)
    conversion = prepare_conversion(source, to=to, dtype=dtype, allow_unmatched=allow_unmatched, dry_run=dry_run)
    if dry_run:
        _show_plan(conversion, json)
        return
    if out is None and conversion.model is not None and not overwrite:
        if to == "paddle-inference":
            cached = layout_output(conversion, dtype, ir, max_seq_len)
        elif to == "tpu-mlir":
            cached = tpu_layout_output(conversion, tpu_options(conversion.plan.family, official_config(
                conversion.config), conversion.output_dtype(), **tpu), onnx)
        else:
            cached = conversion.default_out(shard_limit)
        manifest = reusable_artifact(cached)
        if manifest is not None:
            _reuse_cached(cached, manifest, conversion, smoke=not no_smoke, tokens=tokens, as_json=json)
            return
        overwrite = cached.exists()  # an interrupted or damaged copy in the cache: make it again
    if to == "paddle-inference":
        _deploy_paddle_inference(conversion, source, out, dtype=dtype, ir=ir, max_seq_len=max_seq_len,
                                 overwrite=overwrite, smoke=not no_smoke, tokens=tokens, as_json=json)
        return
    if to == "tpu-mlir":
        _deploy_tpu_mlir(conversion, source, out, tpu, onnx=onnx, overwrite=overwrite, smoke=not no_smoke,
                         tokens=tokens, as_json=json)
        return
    with byte_progress(f"converting to {to}", conversion.plan.total_bytes) as advance:
        result = conversion.write(out, overwrite=overwrite, max_shard_size=shard_limit, on_bytes=advance)
    report = None if no_smoke else _smoke(result.out, conversion, tokens)
    if json:
        print_json({"out": str(result.out), **plan_json(conversion.plan), "files": result.manifest["files"],
                    "smoke": report.as_dict() if report else None, "cached": False})
    else:
        ops = ", ".join(f"{op} x{n}" for op, n in conversion.plan.op_counts.items()) or "copy only"
        stdout.print(f"{escape(str(result.out))}  ({len(conversion.plan.steps)} tensors, "
                     f"{format_size(conversion.plan.total_bytes)}; {ops})")
        if report:
            show_report(report, False)
    if report and not report.passed:
        raise CheckFailed(f"the converted model at {result.out} fails its smoke test: {failure_summary(report)}")


def _reuse_cached(cached: Path, manifest: dict, conversion: Conversion, *, smoke: bool, tokens: int,
                  as_json: bool) -> None:
    """The same conversion of the same revision is in the cache: answer with it (smoke-testing it if that was
    skipped when it was made)."""
    if conversion.checkpoint is not None:
        conversion.checkpoint.close()
    mark_used(cached)
    verdict = manifest.get("smoke")
    if smoke and (verdict is None or verdict.get("passed") is None):
        report = _smoke(cached, conversion, tokens)
        verdict = report.as_dict() if report else verdict
    if as_json:
        assert conversion.model is not None  # only catalog models are converted into the cache
        shape = ({"weights": str(cached / f"{conversion.model.name}-inference"), "graphs": manifest.get("graphs")}
                 if conversion.to == "paddle-inference" else plan_json(conversion.plan))
        print_json({"out": str(cached), **shape, "files": manifest.get("files"), "smoke": verdict, "cached": True})
    else:
        stdout.print(f"{escape(str(cached))}  (cached; --overwrite converts again)")
    if verdict and verdict.get("passed") is False:
        raise CheckFailed(f"the cached conversion at {cached} failed its smoke test; --overwrite converts again")


def _download_if_missing(source: str, *, to: str, dtype: str | None, ir: str, max_seq_len: int,
                         tpu: dict) -> None:
    """One command from a catalog name to a deployment: fetch the model first when it is not here, once the
    options are known to be good (planned from the catalog, no data needed)."""
    spec = find_model(source)
    if spec is None or spec.tiny or Path(source).expanduser().exists() or cached_snapshot(spec) is not None:
        return
    prepare_conversion(source, to=to, dtype=dtype, dry_run=True)
    if to == "paddle-inference":
        check_layout_options(ir, max_seq_len)
    if to == "tpu-mlir":
        tpu_options(spec.family.name, spec.config, "bfloat16", **tpu)
    download_for(spec)


def _deploy_tpu_mlir(conversion: Conversion, source: str, out: Path | None, tpu: dict, *, onnx: bool,
                     overwrite: bool, smoke: bool, tokens: int, as_json: bool) -> None:
    if conversion.checkpoint is not None:  # the layout plans its own conversion, in the dtype --quantize needs
        conversion.checkpoint.close()
    if onnx and smoke:
        check_smoke_image_fits(tpu_options(conversion.plan.family, official_config(conversion.config),
                                           conversion.output_dtype(), **tpu))
    total = conversion.plan.total_bytes
    if onnx:  # float32 networks: about twice the parameters' bf16 bytes, a layer's weights in two networks
        total += 4 * sum(step.target.nbytes for step in conversion.plan.steps)
    what = "model/ and the ONNX networks" if onnx else "the model directory for llm_convert"
    with byte_progress(f"writing {what}", total) as advance:
        layout = build_tpu_mlir(source, out, onnx=onnx, overwrite=overwrite, on_bytes=advance,
                                on_export_bytes=advance, **tpu)
    report = _smoke(layout.out, conversion, tokens) if smoke else None
    if as_json:
        print_json({"out": str(layout.out), "model": str(layout.model_dir), "target": layout.manifest["target"],
                    "files": layout.manifest["files"], "smoke": report.as_dict() if report else None,
                    "cached": False})
    else:
        scripts = "compile.sh; models/onnx/ and compile_onnx.sh" if onnx else "compile.sh"
        stdout.print(f"{escape(str(layout.out))}  (model/ for llm_convert, {scripts}; its README.md says how to "
                     "compile and run it)")
        if report:
            show_report(report, False)
    if report and not report.passed:
        raise CheckFailed(f"the layout at {layout.out} fails its smoke test: {failure_summary(report)}")


def _deploy_paddle_inference(conversion: Conversion, source: str, out: Path | None, *, dtype: str | None, ir: str,
                             max_seq_len: int, overwrite: bool, smoke: bool, tokens: int, as_json: bool) -> None:
    if conversion.checkpoint is not None:  # the layout plans its own conversion, in the loader's dtype
        conversion.checkpoint.close()
    with byte_progress("converting the weights for paddle inference", conversion.plan.total_bytes) as advance:
        layout = build_paddle_inference(source, out, dtype=dtype, ir=ir, max_seq_len=max_seq_len,
                                        overwrite=overwrite, on_bytes=advance)
    report = _smoke(layout.out, conversion, tokens) if smoke else None
    if as_json:
        print_json({"out": str(layout.out), "weights": str(layout.weights_dir), "graphs": layout.manifest["graphs"],
                    "files": layout.manifest["files"], "smoke": report.as_dict() if report else None,
                    "cached": False})
    else:
        stdout.print(f"{escape(str(layout.out))}  (weights in {escape(layout.weights_dir.name)}/, static graphs in "
                     "checkpoints/; its README.md says how to run them)")
        if report:
            show_report(report, False)
    if report and not report.passed:
        raise CheckFailed(f"the layout at {layout.out} fails its smoke test: {failure_summary(report)}")


def _smoke(out: Path, conversion: Conversion, tokens: int) -> SmokeReport | None:
    """Smoke-test a fresh conversion against its source and record the verdict in its manifest."""
    try:
        with smoke_status() as status:
            report = run_smoke(out, against=str(conversion.source_path), tokens=tokens, status=status)
    except RuntimeMissing as exc:
        stderr.print(f"warning: smoke test not run: {exc}", markup=False)
        record_verdict(out, {"passed": None, "not_run": str(exc)})
        return None
    record_verdict(out, report.as_dict())
    return report


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
