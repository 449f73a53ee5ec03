"""Where the cache's locks live: one per model revision, under $VLHUB_HOME/locks (see vlhub.owned for how a
lock behaves when its holder dies)."""

from __future__ import annotations

from pathlib import Path

from vlhub.hub.home import safe_name, vlhub_home


def lock_path(*parts: str) -> Path:
    """A lock file under $VLHUB_HOME/locks named after `parts` (repo ids, revisions: any characters)."""
    name = "--".join(safe_name(part) for part in parts)
    return vlhub_home() / "locks" / f"{name}.lock"
