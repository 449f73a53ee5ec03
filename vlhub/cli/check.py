"""`vlhub check`: the pre-deployment checklist of a layout vlhub wrote, or of a catalog model before conversion.

Examples:
    vlhub check ./tiny-tpu                                   # target from the manifest
    vlhub check ./qwen2-vl-7b-vamc --image 1280x720 --strict
    vlhub check ./tiny-qwen2-vl-paddle-inference --smoke --json
    vlhub check qwen2-vl-7b --target tpu-mlir                # before converting: disk, memory, time, toolchain
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from vlhub.catalog import find_model, unknown_model_message
from vlhub.check import AUTO, FAIL, PASS, WARN, Report, check_model, check_path, check_targets
from vlhub.cli._errors import reports_errors
from vlhub.cli._options import JsonOpt, choices
from vlhub.cli._output import print_json, stage, stdout
from vlhub.errors import CheckFailed, UserError
from vlhub.sizes import parse_size_pair
from vlhub.units import plural

PathArg = Annotated[str, typer.Argument(
    metavar="PATH", show_default=False,
    help="A layout or checkpoint vlhub convert wrote, or a catalog model (with --target) before converting it.")]
TargetOpt = Annotated[str, typer.Option(
    "--target", metavar=choices(check_targets()),
    help=f"What PATH is ({AUTO}: its manifest says, or its weights' format); with a MODEL, the target to "
         "convert it to.")]
ImageOpt = Annotated[list[str] | None, typer.Option(
    "--image", metavar="WxH", show_default=False,
    help="An image size you will send, width x height (1280x720 is 720p landscape); repeat for more. Checked "
         "against the compiled sizes.")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="Exit 1 on warnings too.")]
SmokeOpt = Annotated[bool, typer.Option("--smoke", help="Run the smoke test again instead of reading its verdict.")]

_STYLE = {PASS: "[green]pass[/]", WARN: "[yellow]warn[/]", FAIL: "[red]FAIL[/]"}


@reports_errors
def check(
    path: PathArg,
    target: TargetOpt = AUTO,
    image: ImageOpt = None,
    json: JsonOpt = False,
    strict: StrictOpt = False,
    smoke: SmokeOpt = False,
) -> None:
    """Check a layout (or a model) before deploying it.

    A layout: files against the manifest's sha256, stray weights, key layout, dtype,
    shapes against config.json, tied embeddings, NaN/Inf (streamed), compiled sizes against --image, toolchain,
    disk and memory for the next step, smoke verdict. With a catalog MODEL and --target: what converting and
    compiling it need (disk, memory, time) and whether this machine has it.

    Exit 0 when nothing fails, 1 on a fail (or a warn with --strict), 2 on bad input. --json prints an object:
    mode (layout or model), path, model, target, family, verdict (pass, warn, fail), counts {pass, warn, fail},
    checks [{group, name, status, detail, fix}], needs [{step, resource (disk, memory, time), amount (bytes or
    seconds, null when unknown), where, source}], has {disk_free {directory: bytes}, memory_available}."""
    images = [parse_size_pair(text) for text in image or []]
    local = Path(path).expanduser()
    if local.exists():
        with stage(f"checking {local}") as say:
            report = check_path(local, target=target, images=images, smoke=smoke, say=say)
    elif find_model(path) is not None:
        if smoke:
            raise UserError("--smoke runs a converted layout's smoke test: convert the model first")
        report = check_model(path, target=target, images=images)
    elif local.suffix or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise UserError(f"no such file or directory: {path}")
    else:
        raise UserError(unknown_model_message(path))
    if json:
        print_json(report.to_json())
    else:
        show_report(report)
    failed = report.failed(strict)
    if failed:
        verb = "did not pass" if strict else "failed"
        raise CheckFailed(f"{plural(len(failed), 'check')} {verb}: "
                          + ", ".join(check.name for check in failed))


def show_report(report: Report) -> None:
    """The checklist as a table on stdout, a group's name on its first row, then the tally."""
    what = escape(report.path or report.model or "")
    title = f"vlhub check {what} ({report.target}{f', {report.family}' if report.family else ''})"
    table = Table("group", "check", "status", "detail", "how to fix", box=None, title=title, title_justify="left")
    shown = None
    for check in report.checks:
        table.add_row(check.group if check.group != shown else "", escape(check.name), _STYLE[check.status],
                      escape(check.detail), escape(check.fix))
        shown = check.group
    stdout.print(table)
    counts = report.counts
    stdout.print(f"{counts[PASS]} pass, {counts[WARN]} warn, {counts[FAIL]} fail: {report.verdict.upper()}")
