"""`vlhub cache ls|rm|prune|verify|path`: the managed cache of downloads, built-in models, conversions and layouts.
Downloads are named as `hf cache ls` names them (`model/Qwen/Qwen2-VL-7B-Instruct`); every command takes that id,
a repo id or a catalog name.

Examples:
    vlhub cache ls
    vlhub cache ls model/Qwen/Qwen2-VL-7B-Instruct
    vlhub cache prune --dry-run
    vlhub cache verify qwen2-vl-7b
    vlhub cache path tiny-qwen2-vl --target paddle-inference
    vlhub cache rm qwen2-vl-7b --target paddle --yes
    vlhub cache rm --stale --yes
"""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from vlhub.catalog import find_model
from vlhub.cli._errors import reports_errors
from vlhub.cli._options import JsonOpt
from vlhub.cli._output import byte_progress, print_json, stderr, stdout
from vlhub.errors import CheckFailed, UserError
from vlhub.hub.leftovers import PARTIAL, CacheLeftover, find_leftovers, remove_leftovers
from vlhub.hub.store import (
    DOWNLOAD,
    CacheEntry,
    entries_to_remove,
    find_entry,
    freed_by,
    holding,
    list_entries,
    mark_used,
    remove_entry,
    unreferenced,
    verify_bytes,
    verify_entry,
)
from vlhub.hub.tiny import ensure_tiny_model
from vlhub.targets import TARGETS
from vlhub.units import format_size, plural

cache_app = typer.Typer(
    help="The managed cache: downloads (in the hub clients' caches), built-in models, and the conversions and "
         "deployment layouts vlhub wrote (under $VLHUB_HOME, default ~/.cache/vlhub).",
    no_args_is_help=True,
)

ModelArg = Annotated[str, typer.Argument(metavar="MODEL", help="A cache id (model/Org/Name), repo id or catalog name.",
                                         show_default=False)]
OptionalModelArg = Annotated[str | None, typer.Argument(metavar="MODEL", help="Only this model: a cache id "
                                                        "(model/Org/Name), repo id or catalog name (default: all).",
                                                        show_default=False)]
RemovedModelArg = Annotated[str | None, typer.Argument(metavar="MODEL", help="A cache id (model/Org/Name), repo id "
                                                       "or catalog name (with --stale: only its leftovers; default: "
                                                       "all).", show_default=False)]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="List what would be removed; remove nothing.")]
StaleOpt = Annotated[bool, typer.Option("--stale", help="Remove what killed runs left instead: temporaries of dead "
                                                        "processes, lock files nobody holds, partial downloads "
                                                        "nobody is writing (of MODEL only, if given).")]
TargetOpt = Annotated[
    str | None,
    typer.Option("--target", help=f"An artifact's target ({', '.join(TARGETS)}; with the options it was made with, "
                                  f"e.g. {next(iter(TARGETS))}+dtype=float16), or {DOWNLOAD}.", show_default=False),
]


# (unit, seconds in one, the largest count shown before the next unit), as `hf cache ls` rounds them
_AGO = (("second", 1, 59), ("minute", 60, 59), ("hour", 3600, 23), ("day", 86400, 6), ("week", 7 * 86400, 6),
        ("month", 30 * 86400, 11), ("year", 365 * 86400, None))


def time_ago(timestamp: float | None, now: float | None = None) -> str:
    """`2 days ago`, as `hf cache ls` writes a time ("a few seconds ago" under 20 s); `-` for never."""
    if timestamp is None:
        return "-"
    delta = (time.time() if now is None else now) - timestamp
    if delta < 20:
        return "a few seconds ago"
    for unit, seconds, largest in _AGO:
        count = round(delta / seconds)
        if largest is None or count <= largest:
            return f"{plural(count, unit)} ago"
    raise AssertionError("unreachable")


def _entries_of(model: str | None) -> list[CacheEntry]:
    """The cache's entries, or those of `model`: none of a model named is an error (exit 2), not an empty list."""
    entries = list_entries(model)
    if model is not None and not entries:
        raise UserError(f"nothing of {model} is in the cache (`vlhub cache ls` lists what is there)")
    return entries


@cache_app.command("ls")
@reports_errors
def ls(model: OptionalModelArg = None, json: JsonOpt = False) -> None:
    """List what is in the cache.

    Downloads (named as `hf cache ls` names them), built-in models and artifacts: id, revision, kind, size, last
    used, verified state, smoke verdict."""
    entries = _entries_of(model)
    if json:
        print_json([e.to_json() for e in entries])
        return
    if not entries:
        stdout.print("the cache is empty")
        return
    table = Table("id", "revision", "kind", "size", "last used", "verified", "smoke", box=None)
    for e in entries:
        table.add_row(escape(e.id), escape(e.revision[:12]), escape(e.kind), format_size(e.size),
                      time_ago(e.last_used), e.verified, e.smoke or "")
    stdout.print(table)
    stdout.print(f"{plural(len(entries), 'entry')}, {format_size(sum(e.size for e in entries))}")


@cache_app.command("path")
@reports_errors
def path(model: ModelArg, target: TargetOpt = None) -> None:
    """Print an entry's path, for scripts.

    The model's download (or built-in model), or its artifact for --target (the most recently used when several
    revisions or option sets are cached)."""
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
def rm(model: RemovedModelArg = None, target: TargetOpt = None, stale: StaleOpt = False, yes: YesOpt = False,
       json: JsonOpt = False) -> None:
    """Remove a model's entries, or with --stale what killed runs left.

    All of the model's entries, or one --target's. Asks first unless --yes. While a download, conversion or other
    `cache rm` of an entry runs, fails at once naming it."""
    if stale:
        if target is not None:
            raise UserError("--target chooses entries, --stale removes leftovers: pass one of them")
        _remove_stale(model, yes, json)
        return
    if model is None:
        raise UserError("name the MODEL whose entries to remove, or pass --stale")
    with entries_to_remove(model, target) as entries:
        if not entries:
            raise UserError(f"nothing of {model}{f' for --target {target}' if target else ''} is in the cache "
                            "(`vlhub cache ls` lists what is there)")
        for e in entries:
            stderr.print(f"  {e.kind:<24} {e.revision[:12]:<12} {format_size(e.size):>9}  {e.path}", markup=False,
                         soft_wrap=True)
        total = sum(e.size for e in entries)
        _confirm(plural(len(entries), "entry"), total, yes)
        for e in entries:
            remove_entry(e)
    if json:
        print_json({"removed": [e.to_json() for e in entries], "freed_bytes": total})
    else:
        stdout.print(f"removed {plural(len(entries), 'entry')} ({format_size(total)})")


def _confirm(what: str, total: int, yes: bool) -> None:
    """Ask before deleting, unless --yes; without a terminal to ask on, refuse."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise UserError(f"not deleting {what} ({format_size(total)}) without confirmation: pass --yes")
    if not typer.confirm(f"delete {what} ({format_size(total)})?", err=True):
        raise typer.Exit(1)


def _remove_stale(model: str | None, yes: bool, json: bool) -> None:
    found = find_leftovers(model)
    if found:
        for leftover in found:
            stderr.print(f"  {_describe(leftover)}", markup=False, soft_wrap=True)
        _confirm(plural(len(found), "leftover"), sum(leftover.bytes for leftover in found), yes)
    removed = remove_leftovers(found)
    gone = [leftover for leftover in removed if leftover.restored is None]  # the others were put back in place
    freed = sum(leftover.bytes for leftover in gone)
    kept = sorted({leftover.path for leftover in found} - {leftover.path for leftover in removed})
    if json:
        print_json({"removed": [leftover.to_json() for leftover in removed], "freed_bytes": freed,
                    "kept": [str(path) for path in kept]})
        return
    for leftover in removed:
        if leftover.restored is not None:
            stdout.print(f"restored {escape(str(leftover.restored))} from {escape(str(leftover.path))}")
    for path in kept:
        stdout.print(f"kept {escape(str(path))}: a vlhub run took it up since it was listed")
    where = f" of {escape(model)}" if model else ""
    if found:
        stdout.print(f"removed {plural(len(gone), 'leftover')} of killed runs{where}, {format_size(freed)} freed")
    else:
        stdout.print(f"no leftovers of killed runs{where} in the cache")


@cache_app.command("prune")
@reports_errors
def prune(dry_run: DryRunOpt = False, yes: YesOpt = False, json: JsonOpt = False) -> None:
    """Remove what nothing uses, as `hf cache prune` does.

    Downloaded revisions no branch or tag points at any more, and what killed runs left (temporaries of processes that are gone, lock files nobody holds). Partial downloads
    are kept (the next download of their model continues them; `cache rm --stale` removes them too). Asks first
    unless --yes; while a download of a revision's repo runs, fails at once naming it."""
    revisions = unreferenced(list_entries())
    leftovers = [leftover for leftover in find_leftovers() if leftover.kind != PARTIAL]
    freed = freed_by(revisions) + sum(leftover.bytes for leftover in leftovers)
    what = " and ".join(part for part in (plural(len(revisions), "revision") if revisions else "",
                                          plural(len(leftovers), "leftover") + " of killed runs" if leftovers else "")
                        if part)
    if not what:
        if json:
            print_json({"dry_run": dry_run, "revisions": [], "leftovers": [], "freed_bytes": 0})
        else:
            stdout.print("nothing to prune: every revision is referenced and no killed run left anything")
        return
    for entry in revisions:
        why = ("unreferenced: no branch or tag points at it" if entry.path.is_dir() else
               "its files are gone (another client removed them): vlhub's record of it goes")
        stderr.print(f"  {entry.id} {entry.revision[:12]}  {format_size(entry.size):>9}  {why}", markup=False,
                     soft_wrap=True)
    for leftover in leftovers:
        stderr.print(f"  {_describe(leftover)}", markup=False, soft_wrap=True)
    if not dry_run:
        _confirm(what, freed, yes)
        with holding(revisions, "a revision in the cache") as held:
            for entry in held:
                if entry in unreferenced(held):  # no download pointed a branch at it meanwhile
                    remove_entry(entry)
        remove_leftovers(leftovers)
    if json:
        print_json({"dry_run": dry_run, "revisions": [e.to_json() for e in revisions],
                    "leftovers": [leftover.to_json() for leftover in leftovers], "freed_bytes": freed})
    else:
        stdout.print(f"{'would remove' if dry_run else 'removed'} {what} ({format_size(freed)})")


@cache_app.command("verify")
@reports_errors
def verify(model: OptionalModelArg = None, json: JsonOpt = False) -> None:
    """Re-hash entries offline.

    Downloads against the hashes the hub listed (or their blob names), artifacts
    against their manifests. Exit 1 and the damaged files listed on any mismatch. Also lists what killed runs
    left (removed by `cache rm --stale`), which is no damage."""
    entries, results = list_entries(model), []
    if entries:
        with byte_progress("verifying", sum(verify_bytes(e) for e in entries)) as advance:
            results = [verify_entry(e, on_bytes=advance) for e in entries]
    leftovers = find_leftovers(model)  # after the records are written: writing one sweeps its folder
    if not entries and not leftovers:
        raise UserError(f"nothing {f'of {model} ' if model else ''}is in the cache to verify")
    if json:
        print_json([*({**r.entry.to_json(), "files_checked": r.checked, "damaged": r.damaged, "skipped": r.skipped,
                       "ok": r.ok} for r in results),
                    *({**leftover.to_json(), "ok": True} for leftover in leftovers)])
    else:
        for r in results:
            _show_result(r.entry, r.checked, r.damaged, r.skipped)
        _show_leftovers(leftovers)
    damaged = [r for r in results if not r.ok]
    if damaged:
        raise CheckFailed(f"{plural(sum(len(r.damaged) for r in damaged), 'damaged file')} in "
                          f"{plural(len(damaged), 'entry')}; `vlhub cache rm` them and download or convert "
                          "again")


def _describe(leftover: CacheLeftover) -> str:
    """One leftover as `verify` and `rm --stale` list it."""
    where, size = leftover.path, format_size(leftover.bytes)
    if leftover.kind == PARTIAL:
        return f"{where}: {size} of a download of {leftover.model}, resumable: `{leftover.resume}` continues it"
    if leftover.owner is None:
        return f"{where}: a lock file nobody holds"
    return f"{where}: {size}, left by pid {leftover.owner}, which is no longer running"


def _show_leftovers(leftovers: list[CacheLeftover]) -> None:
    for leftover in leftovers:
        label = "partial" if leftover.kind == PARTIAL else "stale  "
        stdout.print(f"[yellow]{label}[/yellow]  {escape(_describe(leftover))}", soft_wrap=True)
    if leftovers:
        partials = " (a partial download too: continue it instead to keep its bytes)" if any(
            leftover.kind == PARTIAL for leftover in leftovers) else ""
        stdout.print(f"{plural(len(leftovers), 'leftover')} of killed runs, "
                     f"{format_size(sum(leftover.bytes for leftover in leftovers))}: `vlhub cache rm --stale` "
                     f"removes them{partials}", soft_wrap=True)


def _show_result(entry: CacheEntry, checked: int, damaged: list[str], skipped: str | None) -> None:
    name = f"{escape(entry.id)} {escape(entry.kind)} {escape(entry.revision[:12])}"
    if skipped:
        stdout.print(f"[dim]skip[/dim]  {name}: {escape(skipped)}")
    elif damaged:
        stdout.print(f"[red]FAIL[/red]  {name}: {len(damaged)} of {plural(checked, 'file')} damaged")
        for problem in damaged:
            stdout.print(f"        {escape(problem)}")
    else:
        stdout.print(f"[green]ok[/green]    {name}: {plural(checked, 'file')}")
