"""Publishing outputs all or nothing: staging directories swapped in, signals held over the swap,
free disk checked before anything is written."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vlhub.errors import UserError
from vlhub.owned import temporary_name
from vlhub.units import format_size, parse_size


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends, then let them act as they would have.

    `signal.pthread_sigmask` is not enough: it masks the calling thread only, the kernel then hands the
    signal to another thread (a native pool started by an import), and Python still raises
    KeyboardInterrupt in the main thread at once; measured here, 1990 times in 2000. A Python-level handler
    always runs in the main thread, so it can take note instead. Off the main thread no KeyboardInterrupt
    arrives and handlers cannot be set, so there is nothing to hold.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum)) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        if received:
            signal.raise_signal(received[0])


def swap_in(staging: Path, out: Path) -> None:
    """Rename the finished `staging` directory to `out`, setting aside (then removing) what `out` held."""
    old = temporary_name(out).with_suffix(".old")
    try:
        with signals_deferred():
            if out.exists():
                os.rename(out, old)
            try:
                os.rename(staging, out)
            except OSError:
                if old.exists():  # put the previous output back rather than lose both
                    os.rename(old, out)
                raise
    finally:  # also when a Ctrl-C held back during the swap is raised at its end
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_directory(out: Path, source: Path, *, overwrite: bool, needed: int, what: str) -> Iterator[Path]:
    """A staging directory for the layout at `out`, after the checks every layout needs (not the source, empty
    unless `overwrite`, disk for `needed` bytes of `what`); swapped in when the block ends, removed on error."""
    refuse_output_holding(out, source)
    check_output_directory(out, overwrite)
    ensure_free_space(out.parent, needed, what)
    staging = temporary_name(out)
    staging.mkdir(parents=True)
    try:
        yield staging
        swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def refuse_output_holding(out: Path, source: Path) -> None:
    """An output that is the source, or a directory holding it, would destroy it when replaced."""
    real_out, real_source = out.resolve(), source.resolve()
    if real_out == real_source or real_out in real_source.parents:
        raise UserError(f"--out {out} is or contains the source {source}; choose a path outside it")


def check_output_directory(out: Path, overwrite: bool) -> None:
    """Refuse an output directory that cannot be made there, or that holds something, unless `overwrite`."""
    nearest = next(p for p in out.absolute().parents if p.exists())
    if not nearest.is_dir():
        raise UserError(f"{nearest} is a file, so {out} cannot be created; choose another --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} exists and is not empty; pass --overwrite to replace it, or choose another --out")


def ensure_free_space(directory: Path, needed: int, what: str) -> None:
    """Refuse before writing when the filesystem of `directory` (or its first existing parent) is too full,
    keeping VLHUB_MIN_FREE (e.g. 50GB; default 0) free beyond what is written."""
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    needed += needed // 100 + (16 << 20)  # headers, pickle framing, configs and the manifest
    reserve = parse_size(os.environ["VLHUB_MIN_FREE"]) if os.environ.get("VLHUB_MIN_FREE", "0") != "0" else 0
    if free < needed + reserve:
        kept = f" and VLHUB_MIN_FREE keeps {format_size(reserve)} free" if reserve else ""
        raise UserError(f"not enough disk space in {existing}: {what} need {format_size(needed)}{kept}, "
                        f"{format_size(free)} is free")
