"""Shared fixtures: an isolated VLHUB_HOME per test session and the built-in tiny models in it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vlhub.catalog import get_model
from vlhub.hub.tiny import ensure_tiny_model


@pytest.fixture(scope="session", autouse=True)
def vlhub_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("vlhub-home")
    os.environ["VLHUB_HOME"] = str(home)
    return home


@pytest.fixture(autouse=True)
def _toolchain_only_where_marked(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """VLHUB_TPU_MLIR_PYTHON makes every tpu-mlir smoke test run the simulator (minutes): only tests marked
    `toolchain` see it."""
    if request.node.get_closest_marker("toolchain") is None:
        monkeypatch.delenv("VLHUB_TPU_MLIR_PYTHON", raising=False)


@pytest.fixture(scope="session")
def tiny_qwen2_vl(vlhub_home: Path) -> Path:
    return ensure_tiny_model(get_model("tiny-qwen2-vl"))


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl(vlhub_home: Path) -> Path:
    return ensure_tiny_model(get_model("tiny-qwen2.5-vl"))


@pytest.fixture(scope="session")
def tiny_qwen_vl(vlhub_home: Path) -> Path:
    return ensure_tiny_model(get_model("tiny-qwen-vl"))


@pytest.fixture(scope="session")
def tiny_qwen2_vl_transformers5(tiny_qwen2_vl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-qwen2-vl as transformers >= 4.52 saves it: `model.language_model.*`, `model.visual.*`, nested config."""
    import numpy as np
    import transformers

    from vlhub.formats.readers import open_checkpoint
    from vlhub.formats.writers import CheckpointWriter

    source = tmp_path_factory.mktemp("transformers5")
    with open_checkpoint(tiny_qwen2_vl) as checkpoint:
        renamed = {(("model.visual." + name[len("visual."):]) if name.startswith("visual.") else
                    ("model.language_model." + name[len("model."):]) if name.startswith("model.") else name): meta
                   for name, meta in checkpoint.tensors.items()}
        metas = [meta.__class__(new, meta.dtype, meta.shape) for new, meta in renamed.items()]
        with CheckpointWriter(source, "safetensors", metas, max_shard_size=30_000_000) as writer:
            for new, meta in renamed.items():
                writer.write(new, np.asarray(checkpoint.read(meta.name)))
    transformers.AutoConfig.from_pretrained(tiny_qwen2_vl).save_pretrained(source)
    return source
