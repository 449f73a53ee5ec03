"""The console script's entry point: Ctrl-C and SIGTERM handled from its first instant.

Importing the app (typer) and then the command's module (rich, numpy, the targets: imported when the command runs,
vlhub.cli._lazy) takes a while; this module imports nothing heavy, so it can take charge of the signals before that
starts, and keeps it until the command's exit status is known.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import NoReturn


def _terminate(signum: int, frame: object) -> None:
    # `kill`, `timeout` and container stops send SIGTERM: unwind like Ctrl-C so temporaries are removed
    raise KeyboardInterrupt


def _leave_at_once(signum: int, frame: object) -> None:
    # before a command runs nothing is written, so there is nothing to unwind; and an exception raised here could
    # land in a library's import that catches everything, and be lost
    os.write(2, b"interrupted\n")
    os._exit(130)


def unwind_on_signals() -> None:
    """Called as a command starts: from here on Ctrl-C and SIGTERM unwind (KeyboardInterrupt), so what the command
    writes is cleaned up. Only where `main` took charge of the signals (not under a test runner); a SIGINT
    ignored from the start (a background job) stays ignored."""
    if signal.getsignal(signal.SIGTERM) is _leave_at_once:
        signal.signal(signal.SIGTERM, _terminate)
        if signal.getsignal(signal.SIGINT) is _leave_at_once:
            signal.signal(signal.SIGINT, signal.default_int_handler)


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
        signal.signal(signal.SIGTERM, _leave_at_once)
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, _leave_at_once)
        from vlhub.cli.app import main as run_app  # the imports, the app's and the command's, inside the guard

        run_app()
    except KeyboardInterrupt:
        _interrupted()
    except SystemExit as exc:
        if _unreported_interrupt(exc):
            _interrupted()
        raise
