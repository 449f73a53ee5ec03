"""Fault injection for the crash-safety tests: stop the process dead at a chosen commit point.

A commit point is a step that changes what a reader of the disk sees: a rename or exchange that publishes
or retires a file or folder, an fsync that a later rename relies on, the removal of a set-aside copy.
`VLHUB_KILL_AT_COMMIT=N` sends SIGKILL to this process at its Nth commit point, before the step runs;
`VLHUB_COMMIT_LOG=FILE` appends one line per point (`<n> <label>`) so a test can count and name them.
Neither is set for users: then `commit_point` is two dictionary look-ups.
"""

from __future__ import annotations

import os
import signal

_passed = 0


def commit_point(label: str) -> None:
    """Mark the step about to run; killed here when the fault-injection variables say so."""
    global _passed
    kill_at, log = os.environ.get("VLHUB_KILL_AT_COMMIT"), os.environ.get("VLHUB_COMMIT_LOG")
    if kill_at is None and log is None:
        return
    _passed += 1
    if log:
        with open(log, "a", encoding="utf-8") as stream:
            stream.write(f"{_passed} {label}\n")
    if kill_at is not None and int(kill_at) == _passed:
        os.kill(os.getpid(), signal.SIGKILL)
