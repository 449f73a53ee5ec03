"""The `vlhub` application: wiring only; each command lives in its own module."""

from __future__ import annotations

from typing import Annotated

import typer

from vlhub import __version__
from vlhub.cli.cache import cache_app
from vlhub.cli.check import check
from vlhub.cli.convert import convert
from vlhub.cli.download import download
from vlhub.cli.embeddings import dump_embeddings
from vlhub.cli.inspect import inspect
from vlhub.cli.keys import keys
from vlhub.cli.models import models
from vlhub.cli.plan import plan
from vlhub.cli.smoke import smoke

app = typer.Typer(
    name="vlhub",
    help="Convert, check and deploy Qwen-VL family checkpoints (Paddle Inference, TPU-MLIR, vamc).",
    epilog="Errors print one line and exit 2 (bad input) or 1 (a check failed); VLHUB_DEBUG=1 shows tracebacks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _show_version(value: bool) -> None:
    if value:
        print(f"vlhub {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Convert, check and deploy Qwen-VL family checkpoints."""


app.command()(models)
app.command()(download)
app.command()(inspect)
app.command()(convert)
app.command()(keys)
app.command(name="dump-embeddings")(dump_embeddings)
app.command()(smoke)
app.command()(plan)
app.command()(check)
app.add_typer(cache_app, name="cache")


def main() -> None:
    """Run the app. The console script comes here through `vlhub.cli.entry.main`, which handles Ctrl-C and SIGTERM
    from before this module's imports."""
    app()
