"""Ctrl-C and SIGTERM on a real `vlhub` process, at any instant: the one line `interrupted` on stderr and exit 130,
never a traceback, from the moment vlhub's entry point starts (its command modules still importing) to its exit;
and a command that fails leaves no progress bar above its error line.

The process is the point here, so vlhub runs in a fresh interpreter, as the console script pip installed and as
`python -m vlhub`. A signal in the interpreter's own start-up (site and its .pth files: some 30 ms here, before any
vlhub code runs) is Python's to report, so the child first says `ready` once it is up and the instants count from
then. SIGINT reaches the child as in a terminal even when pytest runs in the background (tests/conftest.py).
"""

from __future__ import annotations

import errno
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import Ran, one_line_error, run_vlhub
from vlhub.convert import pipeline

SCRIPT = shutil.which("vlhub", path=str(Path(sys.executable).parent))  # pip puts it beside the interpreter
RUNS = {  # each entry as its launcher runs it
    "vlhub": f"runpy.run_path({SCRIPT!r}, run_name='__main__')",
    "python -m vlhub": "runpy.run_module('vlhub', run_name='__main__', alter_sys=True)",
}
# instants after `ready`: the command's imports take the first tenths of a second, the conversion the next, then
# its smoke test loads Paddle. Not later: Paddle replaces Python's SIGINT handler when it loads, so a Ctrl-C in the
# Paddle smoke test can kill the process outright or be lost (an open problem; see docs/safety.md)
INSTANTS = (0.02, 0.1, 0.2, 0.3)
# a signal that lands once the conversion is published (a fast start-up leaves it the time) interrupts the smoke
# test, which says so above the one line; the conversion's finished progress bar may stand above that
AFTER_THE_CONVERSION = "is converted; its smoke test was interrupted"


def _start(entry: str, *args: str, prelude: str = "") -> subprocess.Popen[str]:
    """`vlhub ARGS` through `entry` in a fresh interpreter, returned once it has printed `ready`: its start-up is
    done and it is about to run the entry. What it imports before (re, runpy, the package vlhub.cli, light) the
    entry would have imported first anyway; `prelude` runs before too."""
    if entry == "vlhub" and SCRIPT is None:
        pytest.skip("no `vlhub` console script beside this interpreter (vlhub is not pip-installed)")
    code = f"import re, runpy, sys, vlhub.cli\n{prelude}\nprint('ready', flush=True)\n{RUNS[entry]}"
    process = subprocess.Popen([sys.executable, "-c", code, *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    if process.stdout.readline() != "ready\n":
        _, stderr = process.communicate(timeout=60)
        pytest.fail(f"the child did not start: {stderr}")
    return process


@pytest.mark.parametrize("instant", INSTANTS)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("entry", list(RUNS))
def test_a_signal_at_any_early_instant_is_one_line_and_130(entry: str, signum: int, instant: float,
                                                          tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    process = _start(entry, "convert", str(tiny_qwen2_vl), "--to", "paddle", "--out", str(tmp_path / "out"))
    time.sleep(instant)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0, f"the command ended before the signal {instant} s in: it needs a longer one"
    lines = stderr.strip().splitlines()
    if AFTER_THE_CONVERSION in " ".join(stderr.split()):
        lines = lines[-1:]
    assert (process.returncode, lines) == (130, ["interrupted"]), stderr


# a Ctrl-C that typer, not the command, receives: while it runs the app's callback, before the command, and once
# the command returned, before the process exits (typer itself makes those a silent exit 130)
INTERRUPTING = """
import functools, signal
from vlhub.cli.app import app

def interrupting(callback, first):
    @functools.wraps(callback)
    def run(*args, **kwargs):
        if first:
            signal.raise_signal(signal.SIGINT)
        result = callback(*args, **kwargs)
        signal.raise_signal(signal.SIGINT)
        return result
    return run

if WHEN == "before the command":
    app.registered_callback.callback = interrupting(app.registered_callback.callback, True)
else:
    command = next(info for info in app.registered_commands if info.callback.__name__ == "models")
    command.callback = interrupting(command.callback, False)
"""


@pytest.mark.parametrize("when", ["before the command", "after the command"])
def test_a_ctrl_c_outside_the_command_is_one_line_and_130(when: str) -> None:
    process = _start("vlhub", "models", prelude=f"WHEN = {when!r}\n{INTERRUPTING}")
    stdout, stderr = process.communicate(timeout=120)
    assert (process.returncode, stderr.strip()) == (130, "interrupted"), stderr
    assert ("qwen2-vl-2b" in stdout) == (when == "after the command")


@pytest.mark.parametrize(("error", "code"), [(KeyboardInterrupt(), 130),
                                             (OSError(errno.ENOSPC, "No space left on device"), 2)],
                         ids=["Ctrl-C", "disk full"])
def test_a_failed_conversion_leaves_no_progress_bar_above_its_error(error: BaseException, code: int,
                                                                    tiny_qwen2_vl: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = pipeline.transpose_last, []

    def failing_transpose(array: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        calls.append(1)
        if len(calls) == 10:  # the bar is on screen, part-way
            raise error
        return real(array, out)

    monkeypatch.setattr(pipeline, "transpose_last", failing_transpose)
    result = run_vlhub("convert", str(tiny_qwen2_vl), "--to", "paddle", "--out", str(tmp_path / "o"), "--no-smoke")
    # without a terminal: the line the step started with once bytes were written (a log's record of it), then the
    # error; no "done" line
    *started, last = result.stderr.splitlines()
    assert started in ([], ["converting to paddle: 81 MB"]), result.stderr
    if code == 130:
        assert (result.returncode, last) == (130, "interrupted"), result.stderr
    else:
        one_line_error(Ran(result.args, code, result.stdout, last), code)


def test_a_finished_conversion_keeps_its_progress_bar(tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    result = run_vlhub("convert", str(tiny_qwen2_vl), "--to", "paddle", "--out", str(tmp_path / "o"), "--no-smoke")
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("converting to paddle") and " MB" in result.stderr, result.stderr
