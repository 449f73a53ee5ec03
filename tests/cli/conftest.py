"""The local fake hub the download, cache and network tests share (tests/fake_hub.py): one server a module, serving
the built-in tiny Qwen2-VL as the official `Qwen/Qwen2-VL-2B-Instruct` (so the catalog name `qwen2-vl-2b` names
it), and for each test a user's environment with caches of its own pointed at it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_hub import FakeHub, user_env

SERVED_REPO = "Qwen/Qwen2-VL-2B-Instruct"


@pytest.fixture(scope="module")
def hub(tiny_qwen2_vl: Path) -> Iterator[FakeHub]:
    with contextlib.closing(FakeHub()) as server:
        server.add_directory(SERVED_REPO, tiny_qwen2_vl)
        yield server


@pytest.fixture
def env(hub: FakeHub, tmp_path: Path) -> dict[str, str]:
    """A user's environment: a fresh HF_HOME and VLHUB_HOME, the fake hub as HF_ENDPOINT."""
    return user_env(hub, tmp_path)
