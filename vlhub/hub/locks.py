"""Where the cache's locks live: one per model revision, under $VLHUB_HOME/locks (see vlhub.owned for how a
lock behaves when its holder dies)."""

from __future__ import annotations

from pathlib import Path

from vlhub.hub.home import safe_name, vlhub_home


def lock_directory() -> Path:
    return vlhub_home() / "locks"


def lock_path(*parts: str) -> Path:
    """A lock file under $VLHUB_HOME/locks named after `parts` (repo ids, revisions: any characters)."""
    name = "--".join(safe_name(part) for part in parts)
    return lock_directory() / f"{name}.lock"


def repo_lock_files(source: str, repo_id: str) -> list[Path]:
    """The lock files of a repo's revisions that exist now: held by a running download, or left by a killed one."""
    return sorted(lock_directory().glob(f"{safe_name(source)}--{safe_name(repo_id)}--*.lock"))
