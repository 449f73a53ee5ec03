"""What killed runs left across the cache, for `vlhub cache verify` to report and `vlhub cache rm --stale` to
remove: temporaries of dead owners and lock files nobody holds (garbage), and partial downloads nobody is
writing (not garbage: the next download of their model continues them).

The cache is $VLHUB_HOME, the model folders of the Hugging Face hub cache and the ModelScope cache. Of the
files other tools keep there, only partial downloads are ever touched (Hugging Face's `blobs/*.incomplete`,
which vlhub resumes too, and ModelScope's `*.incomplete`), and only while no vlhub download of their repo and
no lock of their own client is held.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from vlhub.hub.home import repo_id_of, vlhub_home
from vlhub.hub.locks import lock_directory, repo_lock_files
from vlhub.hub.modelscope import modelscope_cache
from vlhub.hub.store import catalog_name, names_model
from vlhub.owned import Busy, Leftover, exclusive_lock, lock_free, stale_leftovers, sweep

TEMPORARY, LOCK, PARTIAL = "temporary", "lock", "partial"


@dataclass(frozen=True)
class CacheLeftover:
    """A file or folder a killed run left in the cache."""

    path: Path
    bytes: int
    kind: str  # TEMPORARY (its owner is dead), LOCK (nobody holds it) or PARTIAL (a download nobody is writing)
    model: str | None  # the model whose folder holds it (catalog name or repo id), when one does
    owner: int | None = None  # a temporary's owner, no longer running
    resume: str | None = None  # a partial download: the command that continues it
    restored: Path | None = None  # removed: a set-aside copy put back here instead

    def to_json(self) -> dict:
        return {"kind": self.kind, "model": self.model, "path": str(self.path), "size_bytes": self.bytes,
                "owner_pid": self.owner, "resume": self.resume,
                "restored": str(self.restored) if self.restored else None}


def find_leftovers(model: str | None = None) -> list[CacheLeftover]:
    """Everything killed runs left in the cache, or in the folders of one model (catalog name or repo id)."""
    found = {leftover.path: leftover for leftover in (*_in_vlhub_home(), *_in_hf_cache(), *_in_modelscope_cache())}
    return [leftover for leftover in found.values()
            if model is None or (leftover.model is not None and names_model(leftover.model, model))]


def remove_leftovers(leftovers: list[CacheLeftover]) -> list[CacheLeftover]:
    """Remove what `find_leftovers` found, each checked again as it goes (a download may have started since);
    returns what was removed (a set-aside copy is put back rather than removed: see `vlhub.owned.sweep`)."""
    removed: list[CacheLeftover] = []
    locks = lock_directory()
    # a folder with temporaries is swept whole: the sweep decides again, under their locks, what is stale there
    folders = {leftover.path.parent: leftover.model for leftover in leftovers
               if leftover.kind != PARTIAL and leftover.path.parent != locks}
    for folder, model in sorted(folders.items()):
        removed += [_garbage(leftover, model) for leftover in sweep(folder)]
    for leftover in leftovers:
        if (leftover.path.parent == locks and leftover.path.exists() and _take_and_drop(leftover.path)
                or leftover.kind == PARTIAL and _remove_partial(leftover.path)):
            removed.append(leftover)
    return removed


def _garbage(leftover: Leftover, model: str | None) -> CacheLeftover:
    kind = LOCK if leftover.owner is None else TEMPORARY
    return CacheLeftover(leftover.path, leftover.bytes, kind, model, leftover.owner, restored=leftover.restored)


def _walk(root: Path) -> Iterator[tuple[Path, list[Leftover]]]:
    """Each folder under `root` (symlinks not followed) with the stale temporaries and lock files in it; a stale
    temporary folder is reported whole, not entered."""
    for directory, folders, _ in os.walk(root):
        stale = stale_leftovers(Path(directory))
        names = {leftover.path.name for leftover in stale}
        folders[:] = [name for name in folders if name not in names]
        yield Path(directory), stale


def _in_vlhub_home() -> Iterator[CacheLeftover]:
    home = vlhub_home()
    for directory, stale in _walk(home):
        parts = directory.relative_to(home).parts
        model = (parts[1] if parts[:1] == ("artifacts",) and len(parts) > 1 else
                 catalog_name(repo_id_of(parts[2])) if parts[:1] == ("downloads",) and len(parts) > 2 else None)
        yield from (_garbage(leftover, model) for leftover in stale)
    for lock in sorted(lock_directory().glob("*.lock")):  # a download's or `cache rm`'s, whose holder was killed
        if lock_free(lock):
            yield CacheLeftover(lock, _size(lock), LOCK, None)


def _in_hf_cache() -> Iterator[CacheLeftover]:
    from huggingface_hub import constants

    for folder in sorted(Path(constants.HF_HUB_CACHE).glob("models--*")):
        model = catalog_name(repo_id_of(folder.name))
        for _, stale in _walk(folder):
            yield from (_garbage(leftover, model) for leftover in stale)
        for partial in sorted((folder / "blobs").glob("*.incomplete")):
            if not _partial_in_use(partial):
                yield CacheLeftover(partial, _size(partial), PARTIAL, model, resume=f"vlhub download {model}")


def _in_modelscope_cache() -> Iterator[CacheLeftover]:
    root = modelscope_cache()
    for directory, stale in _walk(root):
        parts = directory.relative_to(root).parts  # models/<Org--Name>/snapshots/<revision>/...
        model = catalog_name(repo_id_of(parts[1])) if parts[:1] == ("models",) and len(parts) > 1 else None
        yield from (_garbage(leftover, model) for leftover in stale)
        if len(parts) > 3 and parts[2] == "snapshots":
            revision = "" if parts[3] == "master" else f" --revision {parts[3]}"
            for partial in sorted(directory.glob("*.incomplete")):
                if not _partial_in_use(partial):
                    yield CacheLeftover(partial, _size(partial), PARTIAL, model,
                                        resume=f"vlhub download {model} --source modelscope{revision}")


def _partial_in_use(partial: Path) -> bool:
    """Whether a download may be writing `partial`: a vlhub download of its repo runs, or its client holds the
    file's lock (huggingface_hub: `.locks/<folder>/<hash>.lock`; ModelScope: any of `.lock/`, whose names are
    hashes of what they lock)."""
    from huggingface_hub import constants

    hf_cache, ms_cache = Path(constants.HF_HUB_CACHE), modelscope_cache()
    if partial.is_relative_to(hf_cache):
        folder = partial.parent.parent.name
        source, repo_id = "huggingface", repo_id_of(folder)
        client_locks = [hf_cache / ".locks" / folder / partial.name.replace(".incomplete", ".lock")]
    else:
        source, repo_id = "modelscope", repo_id_of(partial.relative_to(ms_cache).parts[1])
        client_locks = sorted((ms_cache / ".lock").glob("*.lock"))
    return not lock_free(partial) or not all(lock_free(lock) for lock in (*repo_lock_files(source, repo_id), *client_locks))


def _remove_partial(partial: Path) -> bool:
    """Remove a partial download unless a download took it up since it was found: under its own lock, which
    vlhub's downloads take before writing it (and look again after, see `vlhub.hub.download`)."""
    if _partial_in_use(partial):
        return False
    try:
        fd = os.open(partial, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not os.path.samestat(os.fstat(fd), os.stat(partial)):  # completed and replaced meanwhile
            return False
        os.unlink(partial)
        return True
    except (BlockingIOError, FileNotFoundError):
        return False
    finally:
        os.close(fd)


def _take_and_drop(lock: Path) -> bool:
    """Remove a lock file nobody holds the way its holders do: take it, and let go (which removes it)."""
    with suppress(Busy), exclusive_lock(lock, wait=False):
        return True
    return False


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except FileNotFoundError:
        return 0
