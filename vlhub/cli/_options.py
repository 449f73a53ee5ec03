"""Options several commands share, declared once."""

from __future__ import annotations

from typing import Annotated

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
SourceArg = Annotated[
    str,
    typer.Argument(
        metavar="SRC",
        help="A catalog name (e.g. tiny-qwen2-vl, qwen2-vl-7b), a repo id, a checkpoint directory or a weight file.",
        show_default=False,
    ),
]
