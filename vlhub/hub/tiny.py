"""The built-in tiny models, generated on first use into $VLHUB_HOME/tiny/."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from vlhub.catalog import ModelSpec
from vlhub.faults import commit_point
from vlhub.hub.home import vlhub_home
from vlhub.hub.synthetic import write_synthetic_checkpoint
from vlhub.owned import sweep, temporary_name

# bump when the generator or the tiny configs change what it writes, so stale tiny models are not reused
# (2: Qwen2(.5)-VL ViT head_dim 80, as every released model has and TPU-MLIR's llm_convert requires; 3: fused expert
# tensors scaled by each expert's fan-in; 4: the key maps' [release_extras], Qwen3.5's multi-token-prediction head)
GENERATOR_VERSION = 4


def tiny_model_dir(spec: ModelSpec) -> Path:
    return vlhub_home() / "tiny" / f"v{GENERATOR_VERSION}" / spec.name


def ensure_tiny_model(spec: ModelSpec) -> Path:
    """The tiny model's directory, generating it first if needed (atomically: build, then rename; what killed
    builds left beside it is removed first)."""
    final = tiny_model_dir(spec)
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep(final.parent)
    staging = temporary_name(final)
    try:
        write_synthetic_checkpoint(staging, spec.family, spec.config, max_shard_size=spec.max_shard_size)
        try:
            commit_point("publish a built-in model")
            os.rename(staging, final)
        except OSError:
            if not (final / "config.json").is_file():  # not a concurrent builder's finished copy
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
