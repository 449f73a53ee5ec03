"""`vlhub convert`: any supported checkpoint to another format, or into a deployment layout, streaming, then
smoke-tested. The targets, and each one's flags, come from the registry (vlhub.targets).

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
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from vlhub.atomic import check_output_directory, refuse_output_holding
from vlhub.cli._errors import reports_errors
from vlhub.cli._options import JsonOpt, SourceArg, TargetFlags, choices, target_options, with_target_flags
from vlhub.cli._output import byte_progress, print_json, stderr, stdout
from vlhub.cli.download import download_for
from vlhub.cli.smoke import failure_summary, show_report, smoke_status
from vlhub.convert.conversion import Conversion, open_source, plan_json, plan_table_rows
from vlhub.deploy.target import Target
from vlhub.errors import CheckFailed, UserError, VlhubError
from vlhub.hub.sources import Source, locate_source
from vlhub.hub.store import conversion_output, mark_used, reusable_artifact
from vlhub.manifest import ERRORED, INTERRUPTED, NOT_RUN, RUNNING, SKIPPED, Manifest, unfinished_verdict
from vlhub.smoke.run import DEFAULT_TOKENS, RuntimeMissing, checkpoint_smoke_input, record_verdict, run_smoke
from vlhub.smoke.verdict import SmokeReport
from vlhub.targets import TARGETS, smoke_runner, target_named
from vlhub.units import format_size, plural

ToOpt = Annotated[str, typer.Option("--to", metavar=choices(TARGETS), show_default=False,
                                    help="The format or deployment layout to write.")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Output directory (default: beside the source, named after --to).")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the plan and write nothing.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output directory.")]
NoSmokeOpt = Annotated[bool, typer.Option("--no-smoke", help="Skip the smoke test that runs the converted model.")]
TokensOpt = Annotated[int, typer.Option("--tokens", min=1, metavar="N", help="Tokens the smoke test generates.")]


@reports_errors
@with_target_flags(options=True, smoke=True)
def convert(
    source: SourceArg,
    to: ToOpt,
    out: OutOpt = None,
    dry_run: DryRunOpt = False,
    overwrite: OverwriteOpt = False,
    no_smoke: NoSmokeOpt = False,
    tokens: TokensOpt = DEFAULT_TOKENS,
    json: JsonOpt = False,
    *,
    flags: TargetFlags,
) -> None:
    """Convert a checkpoint to a format or a deployment layout.

    Tensor by tensor: keys through the family's key map, Linear weights transposed where the target stores
    them [in, out], dtypes cast only when asked. Nothing is left behind on error.
    Then a smoke test runs the converted model against the source (see `vlhub smoke`): a failure exits 1
    and is recorded in the output's manifest. Without --out a catalog model (downloaded first if need be)
    is converted into the cache, $VLHUB_HOME/artifacts/, and the same command again answers from there."""
    target = target_named(to)
    options = target_options(target, flags.options)
    smoke = not no_smoke
    if flags.smoke and no_smoke:
        raise UserError(f"--{next(iter(flags.smoke)).replace('_', '-')} is for the smoke test: drop it with --no-smoke")
    target_options(target, flags.smoke, smoke=True)  # refuses another target's smoke flags
    located = locate_source(source)
    if located.path is None and not dry_run:  # a catalog model not here: its options checked first, then fetched
        with open_source(located) as catalog:
            spec = target.settle(options, catalog.model, smoke=smoke)
            catalog.plan(target.output, dtype=spec.dtype, allow_unmatched=spec.allow_unmatched)
            target.require(spec)
        assert located.model is not None
        located = located.downloaded(download_for(located.model))
    with open_source(located) as opened:
        spec = target.settle(options, opened.model, smoke=smoke)
        conversion = opened.plan(target.output, dtype=spec.dtype, allow_unmatched=spec.allow_unmatched)
        if dry_run:
            _show_plan(conversion, json)
            return
        target.require(spec)
        if smoke:  # refused before anything is written: the test would otherwise fail after the conversion
            assert opened.checkpoint is not None
            checkpoint_smoke_input(opened.checkpoint.root, conversion.config)
        if out is None:
            out = conversion_output(located, target.name, spec.cache_key())
            if located.model is not None and not overwrite:
                if _answer_from_cache(out, target, conversion, smoke=smoke, tokens=tokens, as_json=json,
                                      smoke_flags=flags.smoke):
                    return
                overwrite = out.exists()  # an interrupted or damaged copy in the cache: make it again
        # refused before the progress starts (the build checks again, under its lock)
        refuse_output_holding(out, conversion.source.local())
        check_output_directory(out, overwrite)
        label, total = target.progress(conversion, spec)
        with byte_progress(label, total) as advance:
            manifest = target.build(conversion, spec, out, overwrite=overwrite, on_bytes=advance, say=advance.say)
    report = _smoke(out, located, tokens, flags.smoke) if smoke else _skip_smoke(out)
    if json:
        print_json({**_output_json(out, target, conversion, manifest), "smoke": report.as_dict() if report else None,
                    "cached": False})
    elif target.is_layout:
        stdout.print(f"{escape(str(out))}  ({escape(target.summary.format(weights=manifest.target.weights))})")
    else:
        ops = ", ".join(f"{op} x{n}" for op, n in conversion.plan.op_counts.items()) or "copy only"
        stdout.print(f"{escape(str(out))}  ({plural(len(conversion.plan.steps), 'tensor')}, "
                     f"{format_size(conversion.plan.total_bytes)}; {ops})")
    _conclude(out, report, json)


def _output_json(out: Path, target: Target, conversion: Conversion, manifest: Manifest) -> dict:
    """An output's --json fields: where it is and its files, and a layout's weight folder, static graphs and
    target, or a checkpoint's plan."""
    written = manifest.to_json()
    if not target.is_layout:
        return {"out": str(out), **plan_json(conversion.plan), "files": written["files"]}
    fields = {"out": str(out), "weights": str(manifest.weights_dir(out))}
    if manifest.graphs is not None:
        fields["graphs"] = manifest.graphs
    return {**fields, "target": written["target"], "files": written["files"]}


def _conclude(out: Path, report: SmokeReport | None, as_json: bool) -> None:
    """Show the smoke report; a failed one exits 1."""
    if report and not as_json:
        show_report(report, False)
    if report and not report.passed:
        raise CheckFailed(f"{out} fails its smoke test: {failure_summary(report)}")


def _answer_from_cache(cached: Path, target: Target, conversion: Conversion, *, smoke: bool, tokens: int,
                       as_json: bool, smoke_flags: dict[str, Any]) -> bool:
    """The same conversion of the same revision is in the cache: answer with it (smoke-testing it if that was
    skipped when it was made, or its smoke flags ask for more) and say so; False when there is none to reuse."""
    manifest = reusable_artifact(cached)
    if manifest is None:
        return False
    mark_used(cached)
    verdict = manifest.smoke
    if smoke and (verdict is None or verdict.get("passed") is None or smoke_flags):
        report = _smoke(cached, conversion.source, tokens, smoke_flags)
        verdict = report.as_dict() if report else verdict
    if as_json:
        print_json({**_output_json(cached, target, conversion, manifest), "smoke": verdict, "cached": True})
    else:
        stdout.print(f"{escape(str(cached))}  (cached; --overwrite converts again)")
    if verdict and verdict.get("passed") is False:
        raise CheckFailed(f"the cached conversion at {cached} failed its smoke test; --overwrite converts again")
    return True


def _smoke(out: Path, source: Source, tokens: int, smoke_flags: dict[str, Any]) -> SmokeReport | None:
    """Smoke-test a fresh conversion against its source and record the verdict in its manifest, whatever
    happens: a test that is interrupted, stops on an error or is killed leaves that in the manifest (`vlhub check`
    reports it), never an output that looks converted without one."""
    record_verdict(out, unfinished_verdict(RUNNING))
    try:
        with smoke_status() as status:
            report = run_smoke(smoke_runner(out, smoke_flags), against=source.local(), tokens=tokens,
                               status=status)
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


def _show_plan(conversion: Conversion, as_json: bool) -> None:
    plan = conversion.plan
    if as_json:
        print_json(plan_json(plan))
        return
    table = Table("source", "target", "shape", "ops", "bytes", box=None,
                  title=f"{plan.family}: {plan.source_layout} -> {plan.target_layout} ({conversion.format})")
    for source, target, before, after, ops, nbytes in plan_table_rows(plan):
        shape = before if before == after else f"{before} -> {after}"
        table.add_row(escape(source), escape(target) if target != source else "=", shape, ops, format_size(nbytes))
    stdout.print(table)
    ops = ", ".join(f"{op} x{n}" for op, n in plan.op_counts.items()) or "copy only"
    stdout.print(f"{plural(len(plan.steps), 'tensor')}, {format_size(plan.total_bytes)}; {ops}; "
                 "nothing written (--dry-run)")
