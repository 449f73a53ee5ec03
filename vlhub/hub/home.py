"""vlhub's own directory ($VLHUB_HOME, default ~/.cache/vlhub) and the names of what it keeps there."""

from __future__ import annotations

import os
import re
from pathlib import Path


def vlhub_home() -> Path:
    """The root of everything vlhub stores."""
    configured = os.environ.get("VLHUB_HOME")
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "vlhub"


def safe_name(text: str) -> str:
    """`text` (a repo id, a revision, an option value) as one file name: other characters become `_`."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def remove_empty_parents(path: Path, levels: int) -> None:
    """Remove up to `levels` directories above `path` while they are empty (never $VLHUB_HOME itself)."""
    for parent in list(path.parents)[:levels]:
        if parent == vlhub_home() or not parent.is_dir() or any(parent.iterdir()):
            return
        parent.rmdir()


def repo_id_of(folder: str) -> str:
    """The repo id a hub cache folder is named after: `models--Org--Name` (Hugging Face), `Org--Name` (ModelScope,
    vlhub's download records)."""
    return folder.removeprefix("models--").replace("--", "/", 1)


def is_repo_id(text: str) -> bool:
    """Whether `text` reads as a Hugging Face repo id, `Org/Name`."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return text.count("/") == 1
