"""SIGKILL at random instants while a command writes (issue 19): `keys --in-place` of a checkpoint and `convert
--to safetensors --overwrite` of an output, ten seeded instants each (benchmarks/bench_faults.py does fifty of each
command, Paddle's too). After each kill the path holds the old state or the new one,
whole; the source is byte-identical; the run again succeeds and leaves no vlhub temporary or lock file.

The checkpoint is a copy of tiny-qwen2.5-vl (42 MB in three safetensors shards and an index). An uninterrupted
run first measures how long the command writes (from the moment its lock file appears to its exit);
each instant is drawn from that span (plus 10 %), counted from the moment the killed run's lock file appears. Three
kills run at a time; a run that finishes before its instant counts as a new state.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import run_vlhub
from vlhub.formats.readers import open_checkpoint
from vlhub.manifest import MANIFEST

KILLS = 10
KEYS_RENAME = ["--rename", "visual.=model.visual.", "--rename", "model.=model.language_model."]
KEYS_BACK = ["--rename", "model.visual.=visual.", "--rename", "model.language_model.=model."]


def _leftovers(root: Path) -> list[str]:
    """vlhub temporaries (`.NAME.vlhub-PID.KIND`) and lock files (`.NAME.vlhub.lock`) under `root`."""
    return [str(p.relative_to(root)) for p in sorted(root.rglob("*"))
            if ".vlhub-" in p.name or p.name.endswith(".vlhub.lock")]


def _digests(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` but vlhub's temporaries and locks."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".vlhub" not in p.relative_to(root).as_posix()}


def _tensors(path: Path) -> dict[str, str]:
    """Every tensor's stored bytes, read through vlhub's reader, by sha256."""
    with open_checkpoint(path, bf16=False) as checkpoint:
        return {name: hashlib.sha256(np.ascontiguousarray(checkpoint.read(name)).tobytes()).hexdigest()
                for name in checkpoint.tensors}


def _output(out: Path) -> dict[str, str]:
    """A converted output's tensors, after checking its manifest lists exactly its files, as they are."""
    manifest = json.loads((out / MANIFEST).read_text())
    found = {name: digest for name, digest in _digests(out).items() if name != MANIFEST}
    assert sorted(found) == sorted(manifest["files"])
    assert all(found[name] == entry["sha256"] for name, entry in manifest["files"].items())
    return _tensors(out)


def _which(found: object, states: dict[str, object]) -> str:
    matches = [name for name, expected in states.items() if found == expected]
    assert matches, "neither the old nor the new state"
    return matches[0]


def _vlhub(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "vlhub", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _until_locked(process: subprocess.Popen[str], lock: Path) -> float:
    """Wait for `process` to take the lock `lock` (or to end); the time it took."""
    start = time.monotonic()
    while not lock.exists() and process.poll() is None:
        time.sleep(0.001)
    return time.monotonic() - start


def _writing_time(args: list[str], lock: Path) -> float:
    """How long an uninterrupted `vlhub ARGS` holds its lock (takes it, writes, publishes, exits)."""
    process = _vlhub(*args)
    _until_locked(process, lock)
    start = time.monotonic()
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return time.monotonic() - start


def _killed_while_writing(args: list[str], lock: Path, delay: float) -> int:
    """Start `vlhub ARGS`, SIGKILL it `delay` seconds after it took its lock; its exit status (0: it was done)."""
    process = _vlhub(*args)
    _until_locked(process, lock)
    try:
        process.wait(delay)
    except subprocess.TimeoutExpired:
        process.kill()
    _, stderr = process.communicate(timeout=300)
    assert "Traceback" not in stderr, stderr
    return process.returncode


def _random_kills(tmp_path: Path, prepare: Callable[[Path], object], command: Callable[[Path], list[str]],
                  lock: Callable[[Path], Path], seed: int) -> dict[Path, int]:
    """KILLS cases, each prepared, then its command killed at a random instant of its write; each case's exit."""
    reference = tmp_path / "reference"
    reference.mkdir()
    prepare(reference)
    span = _writing_time(command(reference), lock(reference)) * 1.1
    rng = random.Random(seed)
    cases = {tmp_path / f"kill-{i}": rng.uniform(0, span) for i in range(KILLS)}
    for case in cases:
        case.mkdir()
        prepare(case)
    with ThreadPoolExecutor(3) as pool:
        statuses = list(pool.map(lambda case: _killed_while_writing(command(case), lock(case), cases[case]), cases))
    assert set(statuses) <= {-9, 0}, statuses
    assert statuses.count(-9) >= 3, f"too few kills landed before the end: {statuses}"
    return dict(zip(cases, statuses))


@pytest.fixture(scope="module")
def source(tiny_qwen2_5_vl: Path, module_tmp: Callable[[str], Path]) -> Path:
    """A copy of tiny-qwen2.5-vl (the session's is shared), in a folder of its own."""
    return Path(shutil.copytree(tiny_qwen2_5_vl, module_tmp("random-kills") / "src"))


def test_keys_in_place_killed_at_random_instants(source: Path, tmp_path: Path) -> None:
    renamed = Path(shutil.copytree(source, tmp_path / "renamed" / "ck"))
    assert run_vlhub("keys", str(renamed), *KEYS_RENAME, "--in-place").returncode == 0
    states = {"old": _digests(source), "new": _digests(renamed)}
    original = _tensors(source)

    statuses = _random_kills(tmp_path, lambda case: shutil.copytree(source, case / "ck"),
                             lambda case: ["keys", str(case / "ck"), *KEYS_RENAME, "--in-place"],
                             lambda case: case / ".ck.vlhub.lock", seed=19)

    for case, status in statuses.items():
        state = _which(_digests(case / "ck"), states)
        assert status == -9 or state == "new"
        assert sorted(_tensors(case / "ck").values()) == sorted(original.values())  # readable, nothing lost
        # the next write there: the same rename, or (renamed already, so refused) the reverse one
        again = run_vlhub("keys", str(case / "ck"), *(KEYS_RENAME if state == "old" else KEYS_BACK), "--in-place")
        assert again.returncode == 0, again.stderr
        assert _leftovers(case) == [], f"{state}, then the run again"
        assert [p.name for p in case.iterdir()] == ["ck"]
    assert _leftovers(tmp_path) == []


def test_convert_overwrite_killed_at_random_instants(source: Path, tmp_path: Path) -> None:
    """Over an older output (float16): the old output or the new one, whole, under --out after any kill."""
    old = tmp_path / "old"
    assert run_vlhub("convert", str(source), "--to", "safetensors", "--out", str(old), "--dtype", "float16",
                     "--no-smoke").returncode == 0
    before = _digests(source)

    def command(case: Path) -> list[str]:
        return ["convert", str(source), "--to", "safetensors", "--out", str(case / "out"), "--no-smoke",
                "--overwrite"]

    statuses = _random_kills(tmp_path, lambda case: shutil.copytree(old, case / "out"), command,
                             lambda case: case / ".out.vlhub.lock", seed=19)

    states = {"old": _output(old), "new": _output(tmp_path / "reference" / "out")}
    for case, status in statuses.items():
        state = _which(_output(case / "out"), states)
        assert status == -9 or state == "new"
        again = run_vlhub(*command(case))
        assert again.returncode == 0, again.stderr
        assert _output(case / "out") == states["new"]
        assert _leftovers(case) == [], f"{state}, then the run again"
        assert [p.name for p in case.iterdir()] == ["out"]
    assert _digests(source) == before
    assert _leftovers(tmp_path) == [] and _leftovers(source.parent) == []
    assert os.listdir(source.parent) == [source.name]
