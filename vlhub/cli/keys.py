"""`vlhub keys`: rename tensor keys in a safetensors or pdparams checkpoint; tensor bytes are copied untouched.

Examples:
    vlhub keys ./qwen-vl-7b-paddle --rename transformer.llm.=qwen. --in-place
    vlhub keys ./qwen-vl-7b-paddle --rename transformer.llm.=qwen. --out ./qwen-vl-7b-static
    vlhub keys ./Qwen2-VL-2B-Instruct --rename visual.=model.visual. --rename model.=model.language_model. --dry-run
    vlhub keys model_state.pdparams --regex --rename '^model\\.layers\\.(\\d+)\\.=llm.h.\\1.' --allow-unknown-layout \\
        --out renamed.pdparams --json
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from vlhub.catalog import find_model
from vlhub.cli._errors import reports_errors
from vlhub.cli._options import JsonOpt, SourceArg
from vlhub.cli._output import byte_progress, print_json, stdout
from vlhub.convert.layouts import UNKNOWN
from vlhub.errors import UserError
from vlhub.hub.sources import resolve_source
from vlhub.keys import RenameResult, parse_rename, rename_keys
from vlhub.units import plural

RenameOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--rename", metavar="OLD=NEW", show_default=False,
        help="Keys starting with OLD get NEW instead of that prefix. Repeatable: each key takes the first --rename "
             "that matches it, in the order given, so put longer prefixes first (model.visual.=visual. before "
             "model.=model.language_model.). Split at the last '='. A --rename that renames nothing is an error.",
    ),
]
RegexOpt = Annotated[
    bool,
    typer.Option("--regex", help="Read OLD as a Python regex and NEW as its replacement: re.sub(OLD, NEW, key, "
                                 "count=1), so only the first match in a key changes (anchor with ^ for a prefix)."),
]
OutOpt = Annotated[
    Path | None,
    typer.Option("--out", help="A new directory for a directory SRC (its other files are copied in, a vlhub manifest "
                               "rewritten for the renamed weights), or the output file for a single-file SRC.",
                 show_default=False),
]
InPlaceOpt = Annotated[
    bool,
    typer.Option("--in-place", help="Replace SRC's weight files and index atomically: the new files are written "
                                    "beside them and renamed over them only once all are complete."),
]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the renames and write nothing.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")]
AllowUnknownOpt = Annotated[
    bool,
    typer.Option("--allow-unknown-layout",
                 help="Write keys that match no layout of the family's key map (no loader vlhub knows reads them); "
                      "without it such a rename is refused, naming the renames that would give a known layout."),
]


@reports_errors
def keys(
    source: SourceArg,
    rename: RenameOpt = None,
    regex: RegexOpt = False,
    out: OutOpt = None,
    in_place: InPlaceOpt = False,
    dry_run: DryRunOpt = False,
    overwrite: OverwriteOpt = False,
    allow_unknown_layout: AllowUnknownOpt = False,
    json: JsonOpt = False,
) -> None:
    """Rename tensor keys, copying the tensors' bytes untouched.

    E.g. transformer.llm.* -> qwen.* for Qwen-VL static inference; no tensor is decoded. Needs --out or
    --in-place unless --dry-run. A vlhub manifest beside the weights is updated (sha256,
    key layout). --json prints an object with source, destination, dry_run, renamed (a list of old/new pairs),
    unchanged (a count), family, layout (of the renamed keys), written and copied (paths)."""
    renames = [parse_rename(text) for text in rename or []]
    if in_place and find_model(source) is not None and not Path(source).exists():
        raise UserError(f"{source} names a shared copy (built-in or in the Hugging Face cache) that other "
                        "commands rely on: --in-place needs a directory you own; use --out")
    result = rename_keys(resolve_source(source), renames, regex=regex, out=out, in_place=in_place,
                         dry_run=dry_run, overwrite=overwrite, allow_unknown_layout=allow_unknown_layout,
                         progress=partial(byte_progress, "renaming keys"))
    if json:
        print_json(result.to_json())
    elif dry_run:
        _print_renames(result)
    else:
        stdout.print(f"renamed {plural(len(result.renamed), 'key')} ({result.unchanged} unchanged)"
                     f"{_layout_note(result)}: "
                     f"{escape(str(result.destination))}  ({plural(len(result.written), 'file')} rewritten, "
                     f"{len(result.copied)} carried over)")


def _layout_note(result: RenameResult) -> str:
    """Which layout the renamed keys are in, for a checkpoint of a family vlhub knows."""
    if result.family is None:
        return ""
    if result.layout == UNKNOWN:
        return f", in no {result.family} layout (--allow-unknown-layout)"
    return f", in the {result.family} {result.layout} layout"


def _print_renames(result: RenameResult) -> None:
    table = Table("old", "", "new", box=None)
    for old, new in result.renamed:
        table.add_row(escape(old), "->", escape(new))
    stdout.print(table)
    stdout.print(f"{plural(len(result.renamed), 'key')} renamed, {result.unchanged} unchanged{_layout_note(result)}; "
                 "nothing written (--dry-run)")
