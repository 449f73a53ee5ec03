"""The `vlhub` application: wiring only; each command lives in its own module, imported when the command runs (or
shows its own help), so `vlhub --help` and `vlhub --version` import none of them (vlhub.cli._lazy)."""

from __future__ import annotations

from typing import Annotated

import typer

from vlhub import __version__
from vlhub.cli._lazy import HELP_SETTINGS, add_lazy_commands

# every command, in the order `vlhub --help` lists them: its name, and where its function is (or, for a group of
# sub-commands, its Typer app). The summaries listed are the functions' docstrings and the app's help.
COMMANDS = {
    "models": "vlhub.cli.models:models",
    "download": "vlhub.cli.download:download",
    "inspect": "vlhub.cli.inspect:inspect",
    "convert": "vlhub.cli.convert:convert",
    "keys": "vlhub.cli.keys:keys",
    "dump-embeddings": "vlhub.cli.embeddings:dump_embeddings",
    "smoke": "vlhub.cli.smoke:smoke",
    "plan": "vlhub.cli.plan:plan",
    "check": "vlhub.cli.check:check",
    "cache": "vlhub.cli.cache:cache_app",
}

# the exit codes, as docs/commands.md lists them ("\b": click keeps the block's lines as they are)
EPILOG = """\b
Exit codes:
  0    done
  1    a check or smoke test failed
  2    bad input: one line on stderr says what is wrong and what to do
  3    the hub could not be reached (network)
  130  interrupted (Ctrl-C, SIGTERM)

VLHUB_DEBUG=1 shows the traceback behind an error line."""

app = typer.Typer(
    name="vlhub",
    help="Convert, check and deploy Qwen-VL family checkpoints (Paddle Inference, TPU-MLIR, vamc).",
    epilog=EPILOG,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # help as click and the `hf` CLI print it: `-h`, flags without a value placeholder, text wrapped to the
    # terminal (typer's rich panels show every flag as `--json <bool>` and keep the docstrings' line breaks)
    rich_markup_mode=None,
    context_settings=HELP_SETTINGS,
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


add_lazy_commands(app, COMMANDS)


def main() -> None:
    """Run the app. The console script comes here through `vlhub.cli.entry.main`, which handles Ctrl-C and SIGTERM
    from before this module's imports (and the command's, which `app()` makes)."""
    app()
