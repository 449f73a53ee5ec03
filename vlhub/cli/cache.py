"""`vlhub cache ls|rm|verify|path`: the managed cache of downloads, built-in models, conversions and layouts.

Examples:
    vlhub cache ls
    vlhub cache verify qwen2-vl-7b
    vlhub cache path tiny-qwen2-vl --target paddle-inference
    vlhub cache rm qwen2-vl-7b --target paddle --yes
"""

from __future__ import annotations

import datetime
import sys
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from vlhub.catalog import find_model
from vlhub.cli._errors import reports_errors
from vlhub.cli._options import JsonOpt
from vlhub.cli._output import byte_progress, print_json, stderr, stdout
from vlhub.errors import CheckFailed, UserError
from vlhub.hub.store import (
    DOWNLOAD,
    CacheEntry,
    find_entry,
    list_entries,
    mark_used,
    remove_entry,
    select_entries,
    verify_bytes,
    verify_entry,
)
from vlhub.hub.tiny import ensure_tiny_model
from vlhub.targets import TARGETS
from vlhub.units import format_size

cache_app = typer.Typer(
    help="The managed cache: downloads (in the hub clients' caches), built-in models, and the conversions and "
         "deployment layouts vlhub wrote (under $VLHUB_HOME, default ~/.cache/vlhub).",
    no_args_is_help=True,
)

ModelArg = Annotated[str, typer.Argument(metavar="MODEL", help="A catalog name or repo id.", show_default=False)]
OptionalModelArg = Annotated[str | None, typer.Argument(metavar="[MODEL]", help="Only this model (default: all).", show_default=False)]
TargetOpt = Annotated[
    str | None,
    typer.Option("--target", help=f"An artifact's target ({', '.join(TARGETS)}; with the options it was made with, "
                                  f"e.g. {next(iter(TARGETS))}+dtype=float16), or {DOWNLOAD}.", show_default=False),
]


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M")


@cache_app.command("ls")
@reports_errors
def ls(model: OptionalModelArg = None, json: JsonOpt = False) -> None:
    """List downloads, built-in models and artifacts: model, revision, kind, size, last used, verified state."""
    entries = list_entries(model)
    if json:
        print_json([e.to_json() for e in entries])
        return
    if not entries:
        stdout.print("the cache is empty" + (f" for {escape(model)}" if model else ""))
        return
    table = Table("model", "revision", "kind", "size", "last used", "verified", "smoke", box=None)
    for e in entries:
        table.add_row(escape(e.model), escape(e.revision[:12]), escape(e.kind), format_size(e.size), _when(e.last_used),
                      e.verified, e.smoke or "")
    stdout.print(table)
    stdout.print(f"{len(entries)} entries, {format_size(sum(e.size for e in entries))}")


@cache_app.command("path")
@reports_errors
def path(model: ModelArg, target: TargetOpt = None) -> None:
    """Print an entry's path, for scripts: the model's download (or built-in model), or its artifact for --target
    (the most recently used when several revisions or option sets are cached)."""
    spec = find_model(model)
    if spec is not None and spec.tiny and target in (None, DOWNLOAD):
        print(ensure_tiny_model(spec))  # built in: always available, generated on first use
        return
    entry = find_entry(model, None if target == DOWNLOAD else target)
    if entry is None:
        what = f"{target} artifact" if target and target != DOWNLOAD else "download"
        raise UserError(f"no {what} of {model} in the cache (`vlhub cache ls` lists what is there)")
    if entry.is_artifact:
        mark_used(entry.path)
    print(entry.path)


@cache_app.command("rm")
@reports_errors
def rm(model: ModelArg, target: TargetOpt = None,
       yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking.")] = False) -> None:
    """Remove a model's entries (all of them, or one --target's); asks first unless --yes."""
    entries = select_entries(model, target)
    if not entries:
        raise UserError(f"nothing of {model}{f' for --target {target}' if target else ''} is in the cache "
                        "(`vlhub cache ls` lists what is there)")
    for e in entries:
        stderr.print(f"  {e.kind:<24} {e.revision[:12]:<12} {format_size(e.size):>9}  {e.path}", markup=False,
                     soft_wrap=True)
    total = format_size(sum(e.size for e in entries))
    if not yes:
        if not sys.stdin.isatty():
            raise UserError(f"not deleting {len(entries)} entries ({total}) without confirmation: pass --yes")
        if not typer.confirm(f"delete these {len(entries)} entries ({total})?", err=True):
            raise typer.Exit(1)
    for e in entries:
        remove_entry(e)
    stdout.print(f"removed {len(entries)} entries ({total})")


@cache_app.command("verify")
@reports_errors
def verify(model: OptionalModelArg = None, json: JsonOpt = False) -> None:
    """Re-hash entries offline: downloads against the hashes the hub listed (or their blob names), artifacts
    against their manifests. Exit 1 and the damaged files listed on any mismatch."""
    entries = list_entries(model)
    if not entries:
        raise UserError(f"nothing {f'of {model} ' if model else ''}is in the cache to verify")
    with byte_progress("verifying", sum(verify_bytes(e) for e in entries)) as advance:
        results = [verify_entry(e, on_bytes=advance) for e in entries]
    if json:
        print_json([{**r.entry.to_json(), "files_checked": r.checked, "damaged": r.damaged, "skipped": r.skipped,
                     "ok": r.ok} for r in results])
    else:
        for r in results:
            _show_result(r.entry, r.checked, r.damaged, r.skipped)
    damaged = [r for r in results if not r.ok]
    if damaged:
        raise CheckFailed(f"{sum(len(r.damaged) for r in damaged)} damaged files in {len(damaged)} entries; "
                          "`vlhub cache rm` them and download or convert again")


def _show_result(entry: CacheEntry, checked: int, damaged: list[str], skipped: str | None) -> None:
    name = f"{escape(entry.model)} {escape(entry.kind)} {escape(entry.revision[:12])}"
    if skipped:
        stdout.print(f"[dim]skip[/dim]  {name}: {escape(skipped)}")
    elif damaged:
        stdout.print(f"[red]FAIL[/red]  {name}: {len(damaged)} of {checked} files damaged")
        for problem in damaged:
            stdout.print(f"        {escape(problem)}")
    else:
        stdout.print(f"[green]ok[/green]    {name}: {checked} files")
