"""vlhub's own directory ($VLHUB_HOME, default ~/.cache/vlhub)."""

from __future__ import annotations

import os
from pathlib import Path


def vlhub_home() -> Path:
    """The root of everything vlhub stores."""
    configured = os.environ.get("VLHUB_HOME")
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "vlhub"
