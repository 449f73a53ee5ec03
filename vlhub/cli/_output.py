"""One place that decides where output goes: results on stdout, progress and messages on stderr."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

# piped output is read by scripts and grep: never cut table cells to fit an imaginary 80 columns
_PIPE_WIDTH = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200
stdout = Console(highlight=False, width=_PIPE_WIDTH)
stderr = Console(stderr=True, highlight=False)


def print_json(data: object) -> None:
    """Machine-readable result on stdout, nothing else on that stream."""
    print(json.dumps(data, indent=2))


@contextmanager
def byte_progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr counting bytes (with bytes/s); yields the function that advances it. `total` may
    be an estimate: the bar ends at what was counted. It stays once the block is done, and goes if it raises."""
    columns = (
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr, transient=False) as progress:
        task = progress.add_task(description, total=total)
        try:
            yield lambda n: progress.advance(task, n)
        except BaseException:  # an error, a full disk, Ctrl-C: its one line must not follow a half-filled bar
            progress.live.transient = True
            raise
        progress.update(task, total=progress.tasks[0].completed)
