"""One place that decides where output goes: results on stdout, progress and messages on stderr.

A step that may take more than a second shows progress on a terminal (a bar counting bytes, or a spinner with the
time elapsed and the step it is at); without a terminal (a log, CI, a pipe) it prints a line as it starts, one
per step, and one when it ends. Neither shows before the step starts working: a bar appears with its first bytes,
so a command that refuses its input first shows none.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from vlhub.units import format_size

# piped output is read by scripts and grep: never cut table cells to fit an imaginary 80 columns
_PIPE_WIDTH = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200
stdout = Console(highlight=False, width=_PIPE_WIDTH)
stderr = Console(stderr=True, highlight=False)


def print_json(data: object) -> None:
    """Machine-readable result on stdout, nothing else on that stream."""
    print(json.dumps(data, indent=2))


def _line(text: str) -> None:
    """One progress line on stderr, as it is (a log reader greps it: never wrapped)."""
    stderr.print(text, markup=False, highlight=False, soft_wrap=True)


def _seconds(started: float) -> str:
    return f"{time.monotonic() - started:.1f} s"


class ByteCounter:
    """What `byte_progress` hands out: call it with the bytes done; `say` names the step they are for (a stage
    of a layout's build that follows the weights, say). Threads may call it at once (a download's files)."""

    def __init__(self, description: str, total: int) -> None:
        self.description, self.total, self.counted = description, total, 0
        self.started = time.monotonic()
        self._progress: Progress | None = None  # on a terminal, once started
        self._task = None
        self._shown = False
        self._ended = False  # finished or abandoned: threads still running (a download's, after Ctrl-C) only count
        self._lock = threading.Lock()  # the first bytes of two threads start one bar, and the count is exact

    def _show(self) -> None:
        """Start showing: the bar on a terminal, the first line without one."""
        if self._shown or self._ended:
            return
        self._shown = True
        if stderr.is_terminal:
            columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                       TimeRemainingColumn())
            self._progress = Progress(*columns, console=stderr, transient=False)
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=self.total, completed=self.counted)
        else:
            _line(f"{self.description}: {format_size(self.total)}")

    def __call__(self, n: int) -> None:
        with self._lock:
            self.counted += n
            if n:
                self._show()
            if self._progress is not None:
                self._progress.advance(self._task, n)  # type: ignore[arg-type]

    def say(self, message: str) -> None:
        with self._lock:
            if self._ended:
                return
            self._show()
            if self._progress is not None:
                self._progress.update(self._task, description=f"{self.description}: {message}")  # type: ignore[arg-type]
            else:
                _line(f"{self.description}: {message}")

    def finish(self) -> None:
        with self._lock:
            self._ended = True
        if self._progress is not None:
            self._progress.update(self._task, total=self.counted)  # type: ignore[arg-type]
            self._progress.stop()
        elif self._shown:
            _line(f"{self.description}: done, {format_size(self.counted)} in {_seconds(self.started)}")

    def abandon(self) -> None:
        """An error, a full disk, Ctrl-C: its one line must not follow a half-filled bar, nor come before one that
        a thread still running starts."""
        with self._lock:
            self._ended = True
        if self._progress is not None:
            self._progress.live.transient = True
            self._progress.stop()


@contextmanager
def byte_progress(description: str, total: int) -> Iterator[ByteCounter]:
    """Progress on stderr counting bytes (a bar with bytes/s on a terminal; a line as the first bytes come and
    one at the end without one); yields the `ByteCounter` to call with bytes done. `total` may be an estimate:
    the bar ends at what was counted. A bar stays once the block is done, and goes if it raises."""
    counter = ByteCounter(description, total)
    try:
        yield counter
    except BaseException:
        counter.abandon()
        raise
    counter.finish()


class _Steps:
    """What `stage` hands out: call it with the step the stage is at."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.started: float | None = None  # shown since (the first step)
        self._progress: Progress | None = None  # on a terminal, once shown
        self._task = None

    def __call__(self, message: str) -> None:
        if self.started is None:
            self.started = time.monotonic()
            if stderr.is_terminal:
                columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
                self._progress = Progress(*columns, console=stderr, transient=True)
                self._progress.start()
                self._task = self._progress.add_task(self.description, total=None)
            else:
                _line(f"{self.description}: started")
        if self._progress is not None:
            self._progress.update(self._task, description=f"{self.description}: {message}")  # type: ignore[arg-type]
        else:
            _line(f"{self.description}: {message}")

    def end(self, finished: bool) -> None:
        if self._progress is not None:
            self._progress.stop()
        elif self.started is not None and finished:
            _line(f"{self.description}: done in {_seconds(self.started)}")


@contextmanager
def stage(description: str) -> Iterator[Callable[[str], None]]:
    """A step with no byte count, on stderr, shown from the first step it reports (a refusal before shows
    nothing): on a terminal a spinner with the time elapsed and the latest step; without one a line as it starts,
    one per step and one when it ends. Yields the function to report a step with."""
    steps = _Steps(description)
    try:
        yield steps
    except BaseException:
        steps.end(finished=False)
        raise
    steps.end(finished=True)
