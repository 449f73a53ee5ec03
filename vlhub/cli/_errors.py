"""How a command fails: one line on stderr and an exit code, a traceback only with VLHUB_DEBUG=1."""

from __future__ import annotations

import functools
import os
import traceback
import warnings
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer

from vlhub.cli._output import stderr
from vlhub.cli.entry import unwind_on_signals
from vlhub.errors import Note, VlhubError

P = ParamSpec("P")
R = TypeVar("R")


def debug_enabled() -> bool:
    return os.environ.get("VLHUB_DEBUG", "") not in ("", "0", "false")


def _report(message: str) -> None:
    if debug_enabled():
        traceback.print_exc()
    stderr.print(f"error: {' '.join(message.split())}", markup=False, highlight=False, soft_wrap=True)


def _shows_notes(shown: Callable[..., None]) -> Callable[..., None]:
    """`warnings.showwarning` that prints a `Note` as `note: <message>` on stderr, and any other as `shown` does."""

    def show(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
        if issubclass(category, Note):
            stderr.print(f"note: {message}", markup=False, highlight=False, soft_wrap=True)
        else:
            shown(message, category, *args, **kwargs)

    return show


def reports_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Wrap a command so a `VlhubError` becomes `error: <message>` and its exit code, a `Note` `note: <message>`."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        unwind_on_signals()
        try:
            with warnings.catch_warnings():  # restores the filters and showwarning when the command ends
                warnings.simplefilter("always", Note)
                warnings.showwarning = _shows_notes(warnings.showwarning)
                return command(*args, **kwargs)
        except VlhubError as exc:
            _report(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:  # the machine refused: a read-only or full disk, a path through a file
            where = f" {exc.filename}" if exc.filename else ""
            _report(f"cannot use{where}: {exc.strerror or exc}")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            stderr.print("interrupted", markup=False)
            raise typer.Exit(130) from None

    return wrapper
