"""Two writers of one path at once (issue 19): two `keys --in-place` of one checkpoint, two conversions of different
sources into one --out, two dumps into one file, none with --overwrite. Exactly one succeeds; the other exits 2 with
one line naming the first one's pid; the path holds the winner's result, whole; no temporary is left.

The two must overlap for the lock to be what decides: the first is started, and once it holds the lock of the path
(its lock file `.NAME.vlhub.lock` names its pid) it is stopped with SIGSTOP, the second runs to its end, and the first
is let go on (SIGCONT) — a writer the scheduler leaves waiting at that instant, made certain. For conversions and
dumps the two are also started at the same instant and left alone: then whichever comes second fails in one line,
by the lock (naming the first's pid) or, if the first has finished by then, because the output exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import one_line_error, run_vlhub
from vlhub.formats.readers import open_checkpoint

KEYS_RENAME = ["--rename", "visual.=model.visual.", "--rename", "model.=model.language_model."]
HEAD_RENAME = ["--rename", "lm_head.=head.", "--allow-unknown-layout"]
TABLES = ("embed_tokens.bin", "embed_tokens.json", "lm_head.bin", "lm_head.json")
# `python -m vlhub` that stops once `vlhub keys` has read the checkpoint, just before it writes the renamed copy (it
# took the checkpoint's lock before 80e1ec5's keys reads, after it before), until the file $VLHUB_TEST_GO exists
# (having made $VLHUB_TEST_READY): a process the scheduler leaves waiting at that instant
PAUSED_BEFORE_WRITING = (
    "import os, runpy, time, vlhub.keys\n"
    "replacing = vlhub.keys.replacing\n"
    "def paused(*args, **kwargs):\n"
    "    open(os.environ['VLHUB_TEST_READY'], 'w').close()\n"
    "    while not os.path.exists(os.environ['VLHUB_TEST_GO']):\n"
    "        time.sleep(0.01)\n"
    "    return replacing(*args, **kwargs)\n"
    "vlhub.keys.replacing = paused\n"
    "runpy.run_module('vlhub', run_name='__main__', alter_sys=True)")


def _leftovers(root: Path) -> list[str]:
    """vlhub temporaries (`.NAME.vlhub-PID.KIND`) and lock files (`.NAME.vlhub.lock`) under `root`."""
    return [str(p.relative_to(root)) for p in sorted(root.rglob("*")) if ".vlhub-" in p.name
            or p.name.endswith(".vlhub.lock")]


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _tensors(path: Path) -> dict[str, str]:
    """Every tensor's stored bytes, read through vlhub's reader, by sha256."""
    with open_checkpoint(path, bf16=False) as checkpoint:
        return {name: hashlib.sha256(np.ascontiguousarray(checkpoint.read(name)).tobytes()).hexdigest()
                for name in checkpoint.tensors}


def _start(*args: str, env: dict[str, str] | None = None, prelude: str | None = None) -> subprocess.Popen[str]:
    launcher = ["-c", prelude] if prelude else ["-m", "vlhub"]
    return subprocess.Popen([sys.executable, *launcher, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})


def _finish(process: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _until(condition: Callable[[], bool], process: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"finished before {what}: {process.communicate()[1]}")
        assert time.monotonic() < deadline, f"never {what}"
        time.sleep(0.001)


def _holds(lock: Path, process: subprocess.Popen[str]) -> Callable[[], bool]:
    """Whether `process` holds the lock `lock` (the holder writes `pid N: COMMAND` into it once it has it)."""
    def held() -> bool:
        try:
            return lock.read_text().startswith(f"pid {process.pid}:")
        except FileNotFoundError:
            return False
    return held


def _second_while_first_holds(first: list[str], second: list[str], locks: list[Path]) -> tuple[
        subprocess.CompletedProcess[str], subprocess.CompletedProcess[str], int]:
    """Start `vlhub FIRST`; once it holds every lock of `locks`, stop it, run `vlhub SECOND` to its end, let the
    first go on. Both results, and the first's pid."""
    winner = _start(*first)
    try:
        for lock in locks:
            _until(_holds(lock, winner), winner, f"holding {lock.name}")
        os.kill(winner.pid, signal.SIGSTOP)
        loser = subprocess.run([sys.executable, "-m", "vlhub", *second], capture_output=True, text=True,
                               timeout=300, check=False)
    finally:
        os.kill(winner.pid, signal.SIGCONT)
    return _finish(winner), loser, winner.pid


def _one_wins(first: subprocess.CompletedProcess[str], second: subprocess.CompletedProcess[str], pid: int) -> None:
    assert first.returncode == 0, first.stderr
    assert "Traceback" not in first.stderr + second.stderr
    line = one_line_error(second)
    assert f"is being written by another vlhub (pid {pid}:" in line, line


# --- keys --in-place ------------------------------------------------------------------------------------------------


def test_two_keys_in_place_on_one_checkpoint(tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    """The issue's case: two renames of one checkpoint a moment apart both exited 0, leaving shards of one with the
    index of the other. The second now fails at once naming the first, whose rename is all the checkpoint holds."""
    checkpoint = Path(shutil.copytree(tiny_qwen2_vl, tmp_path / "ck"))
    alone = Path(shutil.copytree(tiny_qwen2_vl, tmp_path / "alone" / "ck"))
    assert run_vlhub("keys", str(alone), *KEYS_RENAME, "--in-place").returncode == 0

    first, second, pid = _second_while_first_holds(["keys", str(checkpoint), *KEYS_RENAME, "--in-place"],
                                                   ["keys", str(checkpoint), *HEAD_RENAME, "--in-place"],
                                                   [tmp_path / ".ck.vlhub.lock"])

    _one_wins(first, second, pid)
    assert f"error: {checkpoint} is being written" in second.stderr
    assert _digests(checkpoint) == _digests(alone)
    assert _tensors(checkpoint) == _tensors(alone)
    assert _leftovers(tmp_path) == []


def test_keys_in_place_held_after_reading_the_checkpoint(tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    """The second rename has read the checkpoint's headers and is about to write when the first one, started a
    moment later, runs. Before 80e1ec5 the lock came after the reading: the first renamed the checkpoint, the second
    then took the free lock and renamed from the headers it had read, whose keys were gone (KeyError, a traceback;
    started together the two met there about one start offset in thirty on this machine). Now whichever comes
    second fails in one line naming the other, and the checkpoint holds the other's rename, whole."""
    checkpoint = Path(shutil.copytree(tiny_qwen2_vl, tmp_path / "ck"))
    ready, go = tmp_path / "ready", tmp_path / "go"
    held = _start("keys", str(checkpoint), *HEAD_RENAME, "--in-place", prelude=PAUSED_BEFORE_WRITING,
                  env={"VLHUB_TEST_READY": str(ready), "VLHUB_TEST_GO": str(go)})
    try:
        _until(ready.exists, held, "reading the checkpoint")
        other = subprocess.run([sys.executable, "-m", "vlhub", "keys", str(checkpoint), *KEYS_RENAME, "--in-place"],
                               capture_output=True, text=True, timeout=300, check=False)
    finally:
        go.touch()
    late = _finish(held)

    assert "Traceback" not in other.stderr + late.stderr, other.stderr + late.stderr
    assert sorted([other.returncode, late.returncode]) == [0, 2], (other.stderr, late.stderr)
    loser, winner = (other, held) if other.returncode == 2 else (late, None)
    line = one_line_error(loser)
    tensors = _tensors(checkpoint)  # whole
    if winner is held:  # the usual order: the held one had the lock first
        assert f"(pid {held.pid}:" in line, line
        assert "head.weight" in tensors and "model.embed_tokens.weight" in tensors
    else:
        assert "lm_head.weight" in tensors and "model.language_model.embed_tokens.weight" in tensors
    assert _leftovers(tmp_path) == []


# --- convert and dump-embeddings ------------------------------------------------------------------------------------


def _convert(source: Path, out: Path) -> list[str]:
    return ["convert", str(source), "--to", "safetensors", "--out", str(out), "--no-smoke"]


def _dump(source: Path, out: Path) -> list[str]:
    return ["dump-embeddings", str(source), "--out", str(out / "embed_tokens.bin"), "--lm-head"]


def _tables(folder: Path) -> dict[str, str]:
    """The dump's four files, each table matching its sidecar's sha256."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(TABLES)
    for table in ("embed_tokens", "lm_head"):
        sidecar = json.loads((folder / f"{table}.json").read_text())
        assert sidecar["sha256"] == hashlib.sha256((folder / f"{table}.bin").read_bytes()).hexdigest(), table
    return _digests(folder)


COMMANDS: dict[str, tuple[Callable[[Path, Path], list[str]], Callable[[Path], dict[str, str]], list[str]]] = {
    # the command, what its result is (asserted whole), and the locks it holds once it writes, beside OUT or in it
    "convert --out": (_convert, _tensors, [".out.vlhub.lock"]),
    "dump-embeddings --out": (_dump, _tables, ["out/.embed_tokens.bin.vlhub.lock", "out/.lm_head.bin.vlhub.lock"]),
}


@pytest.fixture(scope="module")
def results(tiny_qwen2_vl: Path, tiny_qwen2_5_vl: Path,
            module_tmp: Callable[[str], Path]) -> dict[tuple[str, str], dict[str, str]]:
    """What each command writes from each source alone."""
    made = {}
    for name, (command, result, _) in COMMANDS.items():
        for source in (tiny_qwen2_vl, tiny_qwen2_5_vl):
            out = module_tmp("alone") / "out"
            if name.startswith("dump"):
                out.mkdir()
            ran = run_vlhub(*command(source, out))
            assert ran.returncode == 0, ran.stderr
            made[name, source.name] = result(out)
    return made


def _out(tmp_path: Path, name: str) -> Path:
    out = tmp_path / "out"
    if name.startswith("dump"):
        out.mkdir()  # dump-embeddings writes into an existing folder
    return out


@pytest.mark.parametrize("name", COMMANDS)
def test_two_writers_of_one_output_while_the_first_holds_it(name: str, tiny_qwen2_vl: Path, tiny_qwen2_5_vl: Path,
                                                            tmp_path: Path,
                                                            results: dict[tuple[str, str], dict[str, str]]) -> None:
    """The issue's case for convert: two conversions of different sources into one --out, neither with --overwrite,
    both exited 0 and printed their summary; the folder held only one of them."""
    command, result, locks = COMMANDS[name]
    out = _out(tmp_path, name)
    first, second, pid = _second_while_first_holds(command(tiny_qwen2_vl, out), command(tiny_qwen2_5_vl, out),
                                                   [tmp_path / lock for lock in locks])
    _one_wins(first, second, pid)
    assert result(out) == results[name, tiny_qwen2_vl.name]
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("name", COMMANDS)
def test_two_writers_of_one_output_started_together(name: str, tiny_qwen2_vl: Path, tiny_qwen2_5_vl: Path,
                                                    tmp_path: Path,
                                                    results: dict[tuple[str, str], dict[str, str]]) -> None:
    command, result, _ = COMMANDS[name]
    out = _out(tmp_path, name)
    sources = {tiny_qwen2_vl.name: tiny_qwen2_vl, tiny_qwen2_5_vl.name: tiny_qwen2_5_vl}
    started = {source: _start(*command(path, out)) for source, path in sources.items()}
    pids = {source: process.pid for source, process in started.items()}
    finished = {source: _finish(process) for source, process in started.items()}

    winners = [source for source, ran in finished.items() if ran.returncode == 0]
    assert len(winners) == 1, {source: ran.stderr for source, ran in finished.items()}
    (winner,), (loser,) = winners, [source for source in finished if source not in winners]
    assert "Traceback" not in finished[winner].stderr
    line = one_line_error(finished[loser])
    assert f"(pid {pids[winner]}:" in line or "exists" in line, line
    assert result(out) == results[name, winner]
    assert _leftovers(tmp_path) == []
