"""Publishing outputs all or nothing: staging directories exchanged with what they replace, multi-file commits
behind a journal, signals held over the commit, free disk checked before anything is written."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from vlhub.errors import UserError
from vlhub.faults import commit_point
from vlhub.owned import is_disk_full, temporary_name, write_journal, writing
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


def exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one step (Linux `renameat2(RENAME_EXCHANGE)`): a reader sees one or the other,
    never neither. False where the system or filesystem cannot; nothing has moved then."""
    global _renameat2
    if _renameat2 is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            _renameat2 = libc.renameat2
            _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        except (OSError, AttributeError):  # not Linux, or a libc before 2.28
            _renameat2 = False
    if _renameat2 is False:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):  # a filesystem without it
        return False
    raise OSError(error, os.strerror(error), str(second))


_renameat2: Any = None
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def swap_in(staging: Path, out: Path) -> None:
    """Publish the finished `staging` directory as `out` in one step, then remove what `out` held.

    Where the filesystem cannot exchange two paths, `out` is first set aside as `.NAME.vlhub-PID.old`: a run
    killed between the two renames leaves `out` missing, and the next vlhub run that writes there (or
    `vlhub cache rm --stale`) puts the old copy back (see vlhub.owned.sweep).
    """
    with signals_deferred():
        if not os.path.lexists(out):
            commit_point("publish a new directory")
            os.rename(staging, out)
            return
        commit_point("exchange a directory with its replacement")
        if exchange(staging, out):
            retired = staging  # now holds the previous output, under this run's temporary name
        else:
            retired = temporary_name(out, "old")
            commit_point("set the previous directory aside")
            os.rename(out, retired)
            commit_point("publish the replacement directory")
            os.rename(staging, out)
        _sync_directory(out.parent)
    commit_point("remove the previous directory")
    shutil.rmtree(retired, ignore_errors=True)


def _sync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (a crash of the machine, not just of vlhub, keeps it)."""
    with suppress(OSError):  # some filesystems cannot open or sync a directory; the rename stands anyway
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def staged_directory(out: Path, source: Path, *, overwrite: bool, needed: int, what: str) -> Iterator[Path]:
    """A staging directory for the layout at `out`, after the checks every layout needs (not the source, empty
    unless `overwrite`, disk for `needed` bytes of `what`); swapped in when the block ends, removed on error."""
    refuse_output_holding(out, source)
    check_output_directory(out, overwrite)
    ensure_free_space(out.parent, needed, what)
    with replacing(out, overwrite=overwrite, needed=needed, what=what) as staging:
        yield staging


@contextmanager
def replacing(out: Path, *, overwrite: bool, needed: int, what: str) -> Iterator[Path]:
    """Hold the write lock of the directory `out` (a second writer fails at once, naming this process) and
    hand out an empty staging directory beside it, published as `out` in one step when the block ends.
    On an error or a signal the staging directory is removed and `out` is as it was; a disk that fills
    is reported with the path and the bytes still needed."""
    with writing(out):
        check_output_directory(out, overwrite)  # again under the lock: another writer may just have finished
        staging = temporary_name(out)
        staging.mkdir(parents=True)
        try:
            try:
                yield staging
            except OSError as error:
                if is_disk_full(error):
                    shutil.rmtree(staging, ignore_errors=True)  # first: the free space reported counts it back
                    raise disk_full(out, needed, what) from error
                raise
            swap_in(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def disk_full(path: Path, needed: int, what: str) -> UserError:
    """The one-line error for a disk that filled while writing `needed` bytes of `what` to `path` (what was written
    is removed by then, so the free space now is what the next attempt starts from)."""
    free = shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists())).free
    return UserError(f"the disk filled while writing {what} to {path}: they need {format_size(needed)} and "
                     f"{format_size(free)} is free; free {format_size(max(needed - free, 0))} more, or write "
                     "elsewhere")


def commit_files(moves: Sequence[tuple[Path, Path]]) -> None:
    """Rename each finished temporary over its final path (all in one directory), all or none.

    A journal naming every move is made durable first; a run killed between two renames leaves it behind,
    and the next vlhub run that writes there (or `vlhub cache rm --stale`) completes the renames
    (vlhub.owned.sweep), so the files never stay half old, half new.
    """
    if not moves:
        return
    directory = moves[0][1].parent
    assert all(temp.parent == final.parent == directory for temp, final in moves), "one directory per commit"
    for temp, _ in moves:
        _sync_file(temp)
    journal = write_journal(moves)
    with signals_deferred():
        for temp, final in moves:
            commit_point(f"rename {final.name} into place")
            os.replace(temp, final)
        _sync_directory(directory)
        commit_point("remove the commit journal")
        journal.unlink()


def _sync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def refuse_output_holding(out: Path, source: Path) -> None:
    """An output that is the source, or a directory holding it, would destroy it when replaced."""
    real_out, real_source = out.resolve(), source.resolve()
    if real_out == real_source or real_out in real_source.parents:
        raise UserError(f"--out {out} is or contains the source {source}; choose a path outside it")


def check_output_directory(out: Path, overwrite: bool) -> None:
    """Refuse an output directory that cannot be made there, or that holds something, unless `overwrite`."""
    cwd, real_out = Path.cwd().resolve(), out.resolve()
    if real_out == cwd or real_out in cwd.parents:
        # the finished folder is renamed over `out`: this shell would be left in the old, removed one
        raise UserError(f"{out} is or holds the working directory, and is replaced as a whole: cd elsewhere first")
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
