"""What every deployment target of `vlhub convert` (paddle-inference, tpu-mlir, vamc) is to the CLI: how its
options are checked, where it goes in the cache, how it is built, and what it wrote."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DeployedLayout:
    """A written layout: its directory and its manifest (whose `target.weights` names the weight folder)."""

    out: Path
    manifest: dict


@dataclass(frozen=True)
class Deployment:
    """One `--to` target that writes a deployment layout. Every callable takes the target's own options (the
    `options` names, as the CLI passes them) as keyword arguments."""

    name: str
    options: tuple[str, ...]
    # family, flat official config, source dtype, smoke-tested?, **options: raise UserError on a bad option
    check: Callable[..., None]
    output: Callable[..., Path]  # conversion, **options: the cache directory without --out
    build: Callable[..., DeployedLayout]  # source, out, *, overwrite, on_bytes, **options
    progress: Callable[..., tuple[str, int]]  # conversion, **options: the progress bar's label and bytes
    summary: str  # what the layout holds, after its path; {weights} is the weight folder
