"""`vlhub smoke`: prove a converted checkpoint computes what its source computes.

Examples:
    vlhub smoke ./tiny-qwen2-vl-paddle                       # against the source its manifest names
    vlhub smoke tiny-qwen2-vl --target paddle-inference      # its conversion in the cache
    vlhub smoke ./Qwen2-VL-7B-Instruct-paddle --against ./Qwen2-VL-7B-Instruct --json
    vlhub smoke ./out --tokens 8 --streamed
    vlhub smoke ./tiny-qwen2-vl-paddle-inference             # the static graphs under paddle.inference
    vlhub smoke ./tiny-tpu --tpu-mlir-python ~/tpu/venv/bin/python   # + the bmodel's first token on the cmodel
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from vlhub.catalog import find_model
from vlhub.cli._errors import reports_errors
from vlhub.cli._options import JsonOpt, TargetFlags, choices, with_target_flags
from vlhub.cli._output import print_json, stdout
from vlhub.cli._output import stage as progress_stage
from vlhub.errors import CheckFailed, UserError
from vlhub.hub.sources import resolve_source
from vlhub.hub.store import cached_artifact
from vlhub.smoke.run import DEFAULT_TOKENS, run_smoke
from vlhub.smoke.verdict import TOLERANCES, SmokeReport
from vlhub.targets import TARGETS, smoke_runner, target_named
from vlhub.units import plural

PathArg = Annotated[str, typer.Argument(
    metavar="PATH", help="A converted checkpoint or layout directory, or a catalog model whose conversion is in the "
                         "cache (with --target when it has several).", show_default=False)]
TargetOpt = Annotated[str | None, typer.Option(
    "--target", metavar=choices(TARGETS), help="With a model name: which of its cached conversions.", show_default=False)]
AgainstOpt = Annotated[
    str | None,
    typer.Option("--against", help="Reference checkpoint of the same architecture (default: the source in PATH's manifest)."),
]
TokensOpt = Annotated[int, typer.Option("--tokens", min=1, metavar="N", help="Tokens to generate greedily.")]
StreamedOpt = Annotated[
    bool | None,
    typer.Option("--streamed/--resident", help="Load one layer at a time, or the whole model (default: by size and free memory).",
                 show_default=False),
]

@reports_errors
@with_target_flags(options=False, smoke=True)
def smoke(
    path: PathArg,
    against: AgainstOpt = None,
    tokens: TokensOpt = DEFAULT_TOKENS,
    streamed: StreamedOpt = None,
    target: TargetOpt = None,
    json: JsonOpt = False,
    *,
    flags: TargetFlags,
) -> None:
    """Prove a conversion computes what its source does.

    Run the converted model in its runtime (Paddle for Paddle weights, the numpy reference for the others;
    a deployment layout as its target's smoke test says: its static graphs, its ONNX networks, its bmodel on a
    simulator) and the numpy reference on the source, on one synthetic image and prompt; compare vision
    embeddings, prefill logits and greedy tokens. Exit 0 when within tolerance, 1 when not."""
    runner = smoke_runner(_artifact(path, target), flags.smoke)
    with smoke_status() as status:
        report = run_smoke(runner, against=resolve_source(against) if against else None, tokens=tokens,
                           streamed=streamed, status=status)
    show_report(report, json)
    if not report.passed:
        raise CheckFailed("smoke test failed: " + failure_summary(report))


def _artifact(path: str, target: str | None) -> Path:
    """PATH as given, or the cached conversion a catalog model name stands for."""
    local = Path(path).expanduser()
    if local.exists():
        if target is not None:
            raise UserError(f"--target picks a cached conversion of a model; {path} is a path already: drop --target")
        return local
    if find_model(path) is not None:
        return cached_artifact(path, target if target is None else target_named(target).name)
    raise UserError(f"no such file or directory: {path} (nor a model vlhub knows: `vlhub models` lists them)")


def smoke_status() -> AbstractContextManager[Callable[[str], None]]:
    """The smoke test's progress on stderr, stage by stage: a spinner with the time elapsed on a terminal, a line
    per stage without one (`_output.stage`)."""
    return progress_stage("smoke test")


def failure_summary(report: SmokeReport) -> str:
    return "; ".join(f"{s.name}: {s.detail}" for s in report.stages if not s.passed)


def show_report(report: SmokeReport, as_json: bool) -> None:
    """The smoke verdict as a table (or JSON) on stdout."""
    if as_json:
        print_json(report.as_dict())
        return
    tolerance = TOLERANCES[report.precision]
    table = Table("stage", "max abs diff", "relative", "cosine", "top-1", "verdict", box=None,
                  title=f"smoke: {escape(report.artifact)} ({report.runtime}"
                        f"{', streamed' if report.streamed else ''}) vs {escape(report.reference)}")
    for stage in report.stages:
        table.add_row(
            stage.name,
            _figure(stage.max_abs_diff, ".3g"), _figure(stage.relative, ".2e"), _figure(stage.cosine, ".7f"),
            _figure(stage.top1_agreement, ".1%"),
            "[green]pass[/]" if stage.passed else f"[red]FAIL[/] {escape(stage.detail)}",
        )
    stdout.print(table)
    if report.tokens_ref:  # a layout whose language model cannot run here generates none
        stdout.print(f"tokens: reference {report.tokens_ref}, converted {report.tokens_out}")
    for stage in report.skipped:
        stdout.print(f"not run here: {escape(stage.name)}: {escape(stage.detail)}")
    verdict = "PASSED" if report.passed else "FAILED"
    if report.skipped:
        verdict += f" ({plural(len(report.stages), 'stage')} ran, {len(report.skipped)} not run here)"
    stdout.print(f"precision {report.precision}: relative diff <= {tolerance.relative:g}, cosine >= "
                 f"{tolerance.cosine}; {report.seconds:.1f} s; {verdict}")


def _figure(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)
