"""Shared fixtures: an isolated VLHUB_HOME per test session (per pytest-xdist worker) and the built-in tiny models in
it, and directories for a module's fixtures that go when the module is done."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vlhub.catalog import get_model
from vlhub.hub.tiny import ensure_tiny_model

# The tests read vlhub's output as a script does, from a pipe: rich then lays it out 200 columns wide unless COLUMNS
# says otherwise. pytest-xdist's workers inherit COLUMNS=80 and LINES=24 (GNU readline exports them into the
# controller's environment once something imports it), which would wrap tables and long paths.
for _name in ("COLUMNS", "LINES"):
    os.environ.pop(_name, None)


@pytest.fixture(scope="session", autouse=True)
def vlhub_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("vlhub-home")
    os.environ["VLHUB_HOME"] = str(home)
    return home


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory,
               request: pytest.FixtureRequest) -> Iterator[Callable[[str], Path]]:
    """`tmp_path_factory.mktemp` for a module's fixtures, whose directories are removed once the module's tests are
    done (kept if one of them failed, as tmp_path_retention_policy keeps a failed test's): the run's peak disk is
    then what the modules in progress hold, not what every module ever made."""
    made: list[Path] = []
    failed = request.session.testsfailed

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    if request.session.testsfailed == failed:
        for directory in made:
            shutil.rmtree(directory, ignore_errors=True)


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
