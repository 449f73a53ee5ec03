"""What vlhub owns while it writes: locks on the paths it writes, temporaries named after their owner, and the
sweep that removes what killed runs left.

Locks are `flock(2)` locks on a small file beside the written path (`.NAME.vlhub.lock`). The kernel releases
them when their process dies however it dies (SIGKILL, the OOM killer), so a lock never outlives its owner;
the holder writes its pid and command into the file only so that the next writer can say whom it met, and
removes the file when done (the next writer removes one a killed owner left).

Temporaries are hidden, beside what they become, and name their owner: `.NAME.vlhub-PID.KIND`. A temporary
is stale when its owner is dead and nobody holds the lock of NAME; `sweep` removes stale ones (and puts back
a set-aside `.old` copy whose replacement never arrived), so every run that writes somewhere cleans up after
the runs killed there before it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path

from vlhub.errors import UserError

_TEMPORARY = re.compile(r"\.(?P<name>.+)\.vlhub-(?P<pid>\d+)\.(?P<kind>[a-z]+)")
_LOCK = re.compile(r"\.(?P<name>.+)\.vlhub\.lock")
_held: set[Path] = set()  # lock files this process holds: its own sweeps must not wait on them
_reading: dict[Path, list[int]] = {}  # lock files this process holds shared: [fd, how many holds]


class Busy(UserError):
    """Another process is writing the same path."""


def temporary_name(path: Path, kind: str = "tmp") -> Path:
    """Where `path` is written until it is complete: hidden, in the same directory (so a rename publishes it),
    named after this process."""
    return path.with_name(f".{path.name}.vlhub-{os.getpid()}.{kind}")


def is_owned_name(name: str) -> bool:
    """Whether `name` is one of vlhub's temporaries or lock files."""
    return bool(_TEMPORARY.fullmatch(name) or _LOCK.fullmatch(name))


def lock_file_of(path: Path) -> Path:
    """The file whose lock stands for using `path`: beside it, named after what it really is (a symlink and its
    target share one lock)."""
    real = Path(path).resolve()
    return real.with_name(f".{real.name}.vlhub.lock")


def _holder_text() -> str:
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    command = " ".join(["vlhub" if program == "__main__.py" else program, *sys.argv[1:]])  # `python -m vlhub`
    return f"pid {os.getpid()}: {command[:200]}"


def _holder(fd: int) -> tuple[str, bool]:
    """Who holds the lock on the file open as `fd`, and whether for writing: the kernel's list of locks names the
    processes (Linux); the text a writer left in the file says what it runs."""
    text = os.pread(fd, 256, 0).decode(errors="replace").strip()
    holders = _lock_holders(fd)
    if not holders:
        return text or "another process", True
    writing = any(exclusive for _, exclusive in holders)
    pids = [pid for pid, _ in holders]
    if text.startswith(f"pid {pids[0]}:"):
        return text, writing
    return ", ".join(f"pid {pid}: {_command_of(pid)}" for pid in pids[:3]), writing


def _lock_holders(fd: int) -> list[tuple[int, bool]]:
    """The pids holding an flock on the file open as `fd` and whether each holds it exclusively, from
    /proc/locks (empty where there is none)."""
    stat = os.fstat(fd)
    device = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            lines = [line.split() for line in locks]
    except OSError:
        return []
    mine = os.getpid()
    return sorted({(int(fields[4]), fields[3] == "WRITE") for fields in lines
                   if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == device
                   and fields[4].isdigit() and int(fields[4]) != mine})


def _command_of(pid: int) -> str:
    """A process's command line as typed (`vlhub convert ...`), from /proc."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    words = [word.decode(errors="replace") for word in argv if word]
    while words and (Path(words[0]).name.startswith("python") or words[0] == "-m"):
        words = words[1:]  # `python -m vlhub ...`, `python .../bin/vlhub ...`: the command is what follows
    if words:
        words[0] = "vlhub" if Path(words[0]).name in ("vlhub", "__main__.py") else Path(words[0]).name
    return " ".join(words)[:200]


@contextmanager
def exclusive_lock(
    lock_file: Path, on_wait: Callable[[str], None] | None = None, *, wait: bool = True, what: str | None = None
) -> Iterator[None]:
    """Hold `lock_file` exclusively for the block. If another process holds it: with `wait`, call
    `on_wait(holder)` and wait until it finishes or dies; without, raise `Busy` naming the holder and `what`.
    A lock this process holds for reading (`hold_for_reading`) is turned into the exclusive one, and back."""
    if lock_file in _held:  # this process holds it already (a command that locks early, and its parts again)
        yield
        return
    if lock_file in _reading:
        with _upgraded(lock_file, what):
            yield
        return
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not _try_lock(fd, fcntl.LOCK_EX):
                holder = _holder(fd)
                if not wait:
                    raise _busy(what or str(lock_file), *holder)
                if on_wait is not None:
                    on_wait(holder[0])
                fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(fd, lock_file):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder we met removed that file: lock the one at the path now
    try:
        with _holding(lock_file, fd):
            yield
    finally:
        with suppress(OSError):
            os.unlink(lock_file)  # while still held: whoever opened it meanwhile sees it gone and retries
        os.close(fd)


@contextmanager
def _upgraded(lock_file: Path, what: str | None) -> Iterator[None]:
    """Exclusive use of a lock file this process reads under: no other reader or writer may hold it."""
    fd = _reading[lock_file][0]
    if not _try_lock(fd, fcntl.LOCK_EX):
        holder = _holder(fd)
        with suppress(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a failed conversion may have let go: take it back
        raise _busy(what or str(lock_file), *holder)
    try:
        with _holding(lock_file, fd):
            yield
    finally:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_SH)


@contextmanager
def _holding(lock_file: Path, fd: int) -> Iterator[None]:
    """The block runs as the exclusive holder of `lock_file` (locked as `fd`): its note says who holds it."""
    _held.add(lock_file)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{_holder_text()}\n".encode(), 0)
        yield
    finally:
        _held.discard(lock_file)


def _busy(what: str, holder: str, writing: bool) -> Busy:
    return Busy(f"{what} is being {'written' if writing else 'read'} by another vlhub ({holder}); wait for it to "
                "finish, or stop it")


def _try_lock(fd: int, mode: int, attempts: int = 5) -> bool:
    """Take the lock (`mode`: LOCK_EX or LOCK_SH) if it is free, looking again a few times over 0.1 s: a sweep in
    another process tests locks by taking them for an instant, and that must not look like a writer."""
    for attempt in range(attempts):
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt < attempts - 1:
                time.sleep(0.02)
    return False


def hold_for_reading(path: Path) -> None:
    """Hold a shared lock on `path` until `let_go(path)`, so that no vlhub rewrites, replaces or removes it under
    the reader (those fail at once, naming this process); raises `Busy` while a writer holds it. Holds nest.
    Where no lock file can be made (a folder this user cannot write), the read goes unprotected."""
    lock_file = lock_file_of(path)
    if lock_file in _held:
        return  # this process writes it: nobody else can
    if lock_file in _reading:
        _reading[lock_file][1] += 1
        return
    while True:
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return
        try:
            if _try_lock(fd, fcntl.LOCK_EX, attempts=1):
                os.ftruncate(fd, 0)  # nobody holds it: what a killed writer noted there no longer applies
            if not _try_lock(fd, fcntl.LOCK_SH):
                raise _busy(str(path), *_holder(fd))
            if _same_file(fd, lock_file):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    _reading[lock_file] = [fd, 1]


def let_go(path: Path) -> None:
    """End a `hold_for_reading` of `path`; the last holder removes the lock file, as writers do."""
    lock_file = lock_file_of(path)
    if lock_file not in _reading:
        return
    _reading[lock_file][1] -= 1
    if _reading[lock_file][1]:
        return
    fd = _reading.pop(lock_file)[0]
    try:
        # let go first, then look: of readers leaving together, the last to look finds the lock free and removes
        # the file (converting shared to exclusive directly, each could see the other and both leave it)
        fcntl.flock(fd, fcntl.LOCK_UN)
        if _try_lock(fd, fcntl.LOCK_EX, attempts=1) and _same_file(fd, lock_file):
            os.unlink(lock_file)  # no other reader: nobody needs the file
    except OSError:
        pass
    finally:
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Hold the write lock of `path` for the block, failing at once if another process holds it, and remove
    the temporaries killed writers of `path` left beside it."""
    with exclusive_lock(lock_file_of(path), wait=False, what=str(path)):
        sweep(path.parent, only=path.name)
        yield


@contextmanager
def scratch_directory(beside: Path) -> Iterator[Path]:
    """A working folder for the block, beside `beside` (on its filesystem, not in /tmp), named after this process
    so that a killed run's is swept with `beside`'s temporaries; removed when the block ends."""
    scratch = temporary_name(Path(os.path.abspath(beside)), "scratch")
    scratch.mkdir(parents=True)
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def lock_open_file(fd: int) -> None:
    """Wait for exclusive use of an open file (a partial download two revisions' downloads could share)."""
    fcntl.flock(fd, fcntl.LOCK_EX)


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one we may not signal counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_free(lock_file: Path) -> bool:
    """Whether no process holds an flock on `lock_file` (this process's own locks count as free: it is the owner).
    Tested by taking a shared lock for an instant, which `exclusive_lock` allows for."""
    if lock_file in _held or lock_file in _reading:
        return True
    try:
        fd = os.open(lock_file, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Leftover:
    """A temporary or lock file a killed run left."""

    path: Path
    bytes: int
    owner: int | None  # the dead owner's pid (None for a lock file)
    restored: Path | None = None  # where a set-aside copy was put back instead of removed


def stale_leftovers(directory: Path, only: str | None = None) -> list[Leftover]:
    """The stale temporaries and lock files in `directory` (those of `only`'s name if given), not removed."""
    found: list[Leftover] = []
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return found
    for name in sorted(names):
        path = directory / name
        temporary, lock = _TEMPORARY.fullmatch(name), _LOCK.fullmatch(name)
        if temporary and (only is None or temporary["name"] == only):
            pid = int(temporary["pid"])
            owner_gone = pid != os.getpid() and not process_alive(pid)
            if owner_gone and lock_free(lock_file_of(directory / temporary["name"])):
                found.append(Leftover(path, _size(path), pid))
        elif lock and (only is None or lock["name"] == only) and path not in _held and lock_free(path):
            found.append(Leftover(path, _size(path), None))
    return found


def sweep(directory: Path, only: str | None = None) -> list[Leftover]:
    """Remove what `stale_leftovers` finds, after completing the multi-file commits killed runs left half done
    (every journal in `directory`, whatever `only` says: its temporaries may carry other names); a set-aside
    `.old` copy whose path is empty is put back instead of removed."""
    swept: list[Leftover] = []
    for journal in stale_leftovers(directory):
        match = _TEMPORARY.fullmatch(journal.path.name)
        if match and match["kind"] == "journal":
            _complete_commit(journal.path)
            swept.append(replace(journal, restored=directory / match["name"]))
    for leftover in stale_leftovers(directory, only):
        match = _TEMPORARY.fullmatch(leftover.path.name)
        if match and match["kind"] == "old" and not os.path.lexists(directory / match["name"]):
            os.rename(leftover.path, directory / match["name"])  # killed between moving it aside and the new one in
            swept.append(replace(leftover, restored=directory / match["name"]))
            continue
        if match is None:  # a lock file: take it, so nobody holds it while it goes
            with suppress(Busy), exclusive_lock(leftover.path, wait=False):
                pass  # releasing removes it
        else:
            _remove(leftover.path)
        swept.append(leftover)
    return swept


def put_back(path: Path) -> None:
    """If `path` is missing because a killed run set it aside (`.NAME.vlhub-PID.old`) and never moved its
    replacement in, put it back; a folder this user cannot write is left to its writers."""
    if not os.path.lexists(path):
        with suppress(OSError):
            sweep(path.parent, only=path.name)


def write_journal(moves: Sequence[tuple[Path, Path]]) -> Path:
    """Record, durably, that each temporary of `moves` (all finished, all in one directory) is to be renamed
    over its final path: from here on the commit is completed even if this process dies."""
    journal = temporary_name(moves[0][1], "journal")
    staging = temporary_name(moves[0][1], "journalpart")
    with open(staging, "w", encoding="utf-8") as stream:
        json.dump({"moves": [[temp.name, final.name] for temp, final in moves]}, stream)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(staging, journal)
    return journal


def _complete_commit(journal: Path) -> None:
    """Finish the renames a killed run's journal lists (those not done yet), then remove the journal."""
    try:
        moves = json.loads(journal.read_text(encoding="utf-8"))["moves"]
    except (OSError, ValueError, KeyError, TypeError):
        journal.unlink(missing_ok=True)  # never made durable, so none of its renames ran
        return
    for temp_name, final_name in moves:
        if not all(_plain_name(name) for name in (temp_name, final_name)):
            continue  # names read from a file must stay in this directory
        temp, final = journal.parent / temp_name, journal.parent / final_name
        if temp.exists():
            os.replace(temp, final)
    journal.unlink(missing_ok=True)


def _plain_name(name: object) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(FileNotFoundError):
            path.unlink()


def _size(path: Path) -> int:
    """Bytes under `path` (a file, or a folder's files), counted without following symlinks."""
    try:
        if not path.is_dir() or path.is_symlink():
            return path.lstat().st_size
    except FileNotFoundError:
        return 0
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` is the filesystem running out of space (or of quota)."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
