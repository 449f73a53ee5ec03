"""`vlhub inspect`: what a checkpoint is, read from its headers only.

Examples:
    vlhub inspect tiny-qwen2-vl
    vlhub inspect ./Qwen2-VL-7B-Instruct --json
    vlhub inspect model-00001-of-00005.safetensors --tensors
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from vlhub.cli._errors import reports_errors
from vlhub.cli._options import JsonOpt, SourceArg
from vlhub.cli._output import print_json, stdout
from vlhub.hub.sources import resolve_source
from vlhub.inspect import InspectReport, inspect_checkpoint
from vlhub.units import format_count, format_size

TensorsOpt = Annotated[bool, typer.Option("--tensors", help="Also list every tensor: name, shape, dtype, shard.")]


@reports_errors
def inspect(source: SourceArg, tensors: TensorsOpt = False, json: JsonOpt = False) -> None:
    """Describe a checkpoint, from its headers only.

    Its family, key layout, format, shards, tensors, parameters, dtypes and size."""
    report = inspect_checkpoint(resolve_source(source), list_tensors=tensors)
    if json:
        print_json(report.to_json())
    else:
        _print_report(report)


def _print_report(report: InspectReport) -> None:
    summary = Table(show_header=False, box=None)
    summary.add_row("path", escape(report.path))
    summary.add_row("family", report.family or "unknown")
    summary.add_row("layout", escape(f"{report.layout} ({report.layout_description})"))
    shards = f"{len(report.shards)}" + (f" (index {report.index_file})" if report.index_file else f" ({report.shards[0]})")
    summary.add_row("format", report.format)
    summary.add_row("shards", shards)
    summary.add_row("tensors", str(report.num_tensors))
    summary.add_row("parameters", f"{format_count(report.num_params)} ({report.num_params:,})")
    summary.add_row("size", f"{format_size(report.total_bytes)} ({report.total_bytes:,} bytes)")
    summary.add_row("dtypes", ", ".join(f"{dtype} x{count}" for dtype, count in report.dtypes.items()))
    tied = {True: "yes", False: "no", None: "unknown"}[report.tie_word_embeddings]
    summary.add_row("tied embeddings", tied)
    if report.other_formats:
        summary.add_row("also present", ", ".join(report.other_formats) + f" (ignored; {report.format} wins)")
    stdout.print(summary)
    if report.tensors is not None:
        table = Table("name", "shape", "dtype", "shard", box=None)
        for row in report.tensors:
            table.add_row(escape(row.name), "x".join(map(str, row.shape)) or "scalar", row.dtype, escape(row.shard))
        stdout.print(table)
