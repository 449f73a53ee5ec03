"""Paths read from a file (an index's shards, a manifest's files and folders) joined to the folder holding that file,
only once their real path is known to lie inside it."""

from __future__ import annotations

import os
from pathlib import Path

from vlhub.errors import CorruptCheckpoint


def contained(root: Path, name: str, *, what: str, named_in: Path) -> Path:
    """`root / name`, after checking that it leads inside `root` once every symbolic link on the way is followed;
    else a one-line `CorruptCheckpoint`. `what` is what `root` is ("checkpoint", "output folder") and `named_in`
    the file that names `name`, both for that line.

    The real path, not the text: `sub/x` with `sub` a link to another folder would read, and a rewrite in place
    would write, outside `root` without a single `..`. The one exception is a Hugging Face cache snapshot (see
    `_hub_blob`)."""
    path = root / name
    home = Path(os.path.realpath(root))
    real = Path(os.path.realpath(path))
    if real.is_relative_to(home) or _hub_blob(home, path, real):
        return path
    raise CorruptCheckpoint(f"{named_in} names {name!r}, which leads outside the {what} {root} (to {real}): vlhub "
                            "reads and writes only inside it; copy what it names in (cp -rL copies what links lead to) "
                            f"or correct {named_in.name}")


def _hub_blob(home: Path, path: Path, real: Path) -> bool:
    """Whether `path` is a file of the Hugging Face cache snapshot `home` (`<repo>/snapshots/<commit>`, real) that
    leads to a blob of the same repo: huggingface_hub keeps each file of a snapshot as a link to `<repo>/blobs/<hash>`.

    Only the file itself may be that link, as huggingface_hub makes them: the folders on its way must be the
    snapshot's own, and the blobs folder a real one of the repo (blobs are never in subfolders)."""
    if home.parent.name != "snapshots":
        return False
    return real.parent == home.parent.parent / "blobs" and Path(os.path.realpath(path.parent)).is_relative_to(home)
