"""One place that decides where output goes: results on stdout, progress and messages on stderr."""

from __future__ import annotations

import json
import os
import sys

from rich.console import Console

# piped output is read by scripts and grep: never cut table cells to fit an imaginary 80 columns
_PIPE_WIDTH = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200
stdout = Console(highlight=False, width=_PIPE_WIDTH)
stderr = Console(stderr=True, highlight=False)


def print_json(data: object) -> None:
    """Machine-readable result on stdout, nothing else on that stream."""
    print(json.dumps(data, indent=2))
