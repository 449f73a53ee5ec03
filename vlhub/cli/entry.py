"""The console script's entry point: Ctrl-C and SIGTERM handled from its first instant.

Importing the app (typer) and then the command's module (rich, numpy, the targets: imported when the command runs,
vlhub.cli._lazy) takes a while; this module imports nothing heavy, so it can take charge of the signals before that
starts, and keeps it until the command's exit status is known.
"""

from __future__ import annotations

import signal
import sys
from typing import NoReturn


def _terminate(signum: int, frame: object) -> None:
    # `kill`, `timeout` and container stops send SIGTERM: unwind like Ctrl-C so temporaries are removed
    raise KeyboardInterrupt


def _interrupted() -> NoReturn:
    sys.stderr.write("interrupted\n")
    sys.exit(130)


def _unreported_interrupt(exc: SystemExit) -> bool:
    """Whether typer swallowed a KeyboardInterrupt into this exit: one that came outside a command (while typer
    runs the app's callback, or once the command returned) is typer's silent exit 130, raised from the
    KeyboardInterrupt; a command's own (`reports_errors`) has printed the line and raises its exit from None."""
    return exc.code == 130 and isinstance(getattr(exc.__context__, "__cause__", None), KeyboardInterrupt)


def main() -> None:
    """Run `vlhub`; an interruption at any instant is the line `interrupted` on stderr and exit 130."""
    try:
        signal.signal(signal.SIGTERM, _terminate)
        from vlhub.cli.app import main as run_app  # the imports, the app's and the command's, inside the guard

        run_app()
    except KeyboardInterrupt:
        _interrupted()
    except SystemExit as exc:
        if _unreported_interrupt(exc):
            _interrupted()
        raise
