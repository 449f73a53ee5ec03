"""One place that decides where output goes: results on stdout, progress and messages on stderr."""

from __future__ import annotations

import json

from rich.console import Console

stdout = Console(highlight=False, soft_wrap=True)
stderr = Console(stderr=True, highlight=False)


def print_json(data: object) -> None:
    """Machine-readable result on stdout, nothing else on that stream."""
    print(json.dumps(data, indent=2))
