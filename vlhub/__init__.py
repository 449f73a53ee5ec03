"""vlhub: get Qwen-VL family checkpoints running on Paddle Inference, Sophgo TPUs and VastAI VACC.

The public API, imported on first use so `import vlhub` stays light (and never imports paddle or torch):

    from vlhub import open_checkpoint, inspect_checkpoint, CheckpointWriter, get_model
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "open_checkpoint": "vlhub.formats.readers",
    "Checkpoint": "vlhub.formats.readers",
    "CheckpointWriter": "vlhub.formats.writers",
    "inspect_checkpoint": "vlhub.inspect",
    "get_model": "vlhub.catalog",
    "models": "vlhub.catalog",
    "resolve_source": "vlhub.hub.sources",
    "TensorMeta": "vlhub.formats.tensors",
    "VlhubError": "vlhub.errors",
}
__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'vlhub' has no attribute {name!r}")
