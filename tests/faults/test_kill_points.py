"""Kills at every commit point (issue 19): each command that writes is first run once with VLHUB_COMMIT_LOG to
enumerate its commit points, then once per point N as a real process that VLHUB_KILL_AT_COMMIT=N stops dead
(SIGKILL) just before that step. After each kill:

(a) the written path holds exactly the old state or exactly the new one (or nothing, for a new output): every file
    as one of the two runs writes it, every tensor readable (and `vlhub inspect` reads a checkpoint); a
    dump-embeddings commit, which renames several files behind a journal, may also stop between its renames, with
    the journal naming the renames still to do, and rolling it forward gives the new state;
(b) the command's source (the checkpoint converted or dumped) is byte-identical;
(c) once the command has run again successfully (with --overwrite where the output exists), no vlhub temporary or
    lock file, and nothing that was not there before, is left in the test's directory.

The checkpoint is tiny-qwen2-vl's architecture with a 2048-token vocabulary (4 MB in 15 safetensors shards, with the
manifest `vlhub convert` writes): the commit points do not depend on the size. Each kill is a fresh interpreter
(three at a time); the enumerating run and the runs after the kills are in this process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import run_vlhub, small_sharded_source, transformers_qwen2_vl
from vlhub.formats.readers import open_checkpoint
from vlhub.manifest import MANIFEST

KEYS_RENAME = ["--rename", "visual.=model.visual.", "--rename", "model.=model.language_model."]  # to transformers 5
KEYS_BACK = ["--rename", "model.visual.=visual.", "--rename", "model.language_model.=model."]
PD_RENAME = ["--rename", "lm_head.=head.", "--allow-unknown-layout"]
PD_BACK = ["--rename", "head.=lm_head.", "--allow-unknown-layout"]
# `python -m vlhub` on a filesystem without renameat2(RENAME_EXCHANGE) (NFS, most FUSE): the old folder is moved
# aside, then the new one in (vlhub.atomic.swap_in)
NO_EXCHANGE = ("import runpy, vlhub.atomic\n"
               "vlhub.atomic.exchange = lambda first, second: False\n"
               "runpy.run_module('vlhub', run_name='__main__', alter_sys=True)")
EXCHANGE = "exchange a directory with its replacement"
SET_ASIDE, PUBLISH_AFTER = "set the previous directory aside", "publish the replacement directory"
REMOVE_OLD = "remove the previous directory"
TABLES = ("embed_tokens.bin", "embed_tokens.json", "lm_head.bin", "lm_head.json")


# --- files, tensors, states -----------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _vlhub_owned(name: str) -> bool:
    """A vlhub temporary (`.NAME.vlhub-PID.KIND`) or lock file (`.NAME.vlhub.lock`)."""
    return ".vlhub-" in name or name.endswith(".vlhub.lock")


def _leftovers(root: Path) -> list[str]:
    """Every vlhub temporary or lock file under `root`, with its size."""
    return [f"{path.relative_to(root)} ({path.stat().st_size if path.is_file() else 'folder'})"
            for path in sorted(root.rglob("*")) if _vlhub_owned(path.name)]


def _digests(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (relative path -> digest), vlhub's own temporaries left out."""
    return {path.relative_to(root).as_posix(): _sha256(path) for path in sorted(root.rglob("*"))
            if path.is_file() and not any(_vlhub_owned(part) for part in path.relative_to(root).parts)}


def _tensors(path: Path) -> dict[str, str]:
    """sha256 of every tensor, each read through vlhub's reader: the checkpoint is readable to its last byte."""
    with open_checkpoint(path, bf16=False) as checkpoint:
        return {name: hashlib.sha256(np.ascontiguousarray(checkpoint.read(name)).tobytes()).hexdigest()
                for name in checkpoint.tensors}


def _consistent(layout: Path) -> dict:
    """The manifest of an output, asserted to list exactly the files there, with their sha256 and size."""
    manifest = json.loads((layout / MANIFEST).read_text())
    on_disk = {name: digest for name, digest in _digests(layout).items() if name != MANIFEST}
    assert sorted(on_disk) == sorted(manifest["files"]), f"{layout}: not the files its manifest lists"
    for name, entry in manifest["files"].items():
        assert (entry["sha256"], entry["size"]) == (on_disk[name], (layout / name).stat().st_size), name
    return manifest


def _which(found: object, states: dict[str, object], where: Path) -> str:
    matches = [name for name, expected in states.items() if found == expected]
    assert matches, f"{where} holds neither the old nor the new state"
    return matches[0]


def _checkpoint_state(path: Path, states: dict[str, dict[str, str]]) -> str:
    """Which of `states` (name -> the digest of every file) the checkpoint folder at `path` is, all of it read."""
    if not path.exists():
        return "absent"
    state = _which(_digests(path), states, path)
    _tensors(path)
    inspected = run_vlhub("inspect", str(path))
    assert inspected.returncode == 0, inspected.stderr
    return state


def _output_state(path: Path, states: dict[str, dict[str, str]], weights: Callable[[Path], Path] = lambda p: p) -> str:
    """Which of `states` (name -> the tensors' digests in `weights(path)`) the output at `path` is: a complete output
    whose manifest matches its files; else "absent", or "aside" when the old output is beside it, moved aside as
    `.NAME.vlhub-PID.old` by a run killed before it moved the new one in (vlhub.atomic.swap_in's fallback)."""
    if not path.exists():
        aside = list(path.parent.glob(f".{path.name}.vlhub-*.old"))
        if not aside:
            return "absent"
        assert len(aside) == 1 and _output_state(aside[0], states, weights) == "old", aside
        return "aside"
    _consistent(path)
    return _which(_tensors(weights(path)), states, path)


def _dump_state(folder: Path, states: dict[str, dict[str, str]]) -> str:
    """Which of `states` (name -> the tables' digests) the dump in `folder` is: each table matching its sidecar's
    sha256 and size, both tables from the same run. Caught between the renames of its commit, "journal": the
    journal names the renames still to do, and doing them gives the new state."""
    present = {name: folder / name for name in TABLES if (folder / name).exists()}
    if not present:
        return "absent"
    try:
        return _which(_tables(present), states, folder)
    except AssertionError:
        journals = list(folder.glob(".*.vlhub-*.journal"))
        assert len(journals) == 1, f"{folder}: a half-made dump and no journal to finish it"
        moves = json.loads(journals[0].read_text())["moves"]
        rolled = {**present, **{final: folder / temp for temp, final in moves if (folder / temp).exists()}}
        assert _which(_tables(rolled), states, folder) == "new"
        return "journal"


def _tables(files: dict[str, Path]) -> dict[str, str]:
    assert sorted(files) == sorted(TABLES), sorted(files)
    digests = {}
    for table in ("embed_tokens", "lm_head"):
        sidecar = json.loads(files[f"{table}.json"].read_text())
        digest = digests[table] = _sha256(files[f"{table}.bin"])
        assert (sidecar["sha256"], sidecar["size"]) == (digest, files[f"{table}.bin"].stat().st_size), table
        digests[f"{table} dtype"] = sidecar["dtype"]
    return digests


# --- running and killing vlhub --------------------------------------------------------------------------------------


def _points(args: list[str], log: Path, *, prelude: str | None = None) -> list[str]:
    """The commit points of one successful `vlhub ARGS`, in order: in this process (whose numbering goes on from
    earlier runs here: the order is what counts), or in a fresh one running `prelude` first."""
    if prelude is None:
        ran = run_vlhub(*args, env={"VLHUB_COMMIT_LOG": str(log)})
        assert ran.returncode == 0, ran.stderr
    else:
        done = subprocess.run([sys.executable, "-c", prelude, *args], capture_output=True, text=True, check=False,
                              timeout=300, env={**os.environ, "VLHUB_COMMIT_LOG": str(log)})
        assert done.returncode == 0, done.stderr
    return [line.split(" ", 1)[1] for line in log.read_text().splitlines()]


def _kill_at(point: int, args: list[str], *, prelude: str | None = None) -> None:
    """`vlhub ARGS` in a fresh interpreter, killed by SIGKILL at its commit point `point`."""
    launcher = ["-c", prelude] if prelude else ["-m", "vlhub"]
    result = subprocess.run([sys.executable, *launcher, *args], capture_output=True, text=True, check=False,
                            timeout=300, env={**os.environ, "VLHUB_KILL_AT_COMMIT": str(point)})
    assert result.returncode == -9, f"not killed at {point} (exit {result.returncode}): {result.stderr}"


@dataclass
class Scenario:
    """A command killed at its commit points, each kill in a case directory of its own. The command's first run,
    which enumerates the commit points, is in `tmp/count` and gives the new state."""

    tmp: Path
    command: Callable[[Path], list[str]]  # its arguments, for a case directory
    written: str  # the path it writes, relative to the case directory
    prepare: Callable[[Path], object]  # fills a new case directory with what is there before the command
    state: Callable[[Path], str]  # the state a case directory is in ("absent", "old", "new"...), asserted whole
    source: Path  # what the command reads and must leave as it was
    # the run after a kill that left a state, and what it leaves (asserted): by default the same command, the new state
    again: Callable[[Path, str], tuple[list[str], Callable[[Path], object]]] | None = None
    only: Callable[[int, list[str]], bool] = lambda n, labels: True  # which commit points (1-based) to kill at
    prelude: str | None = None  # code the killed processes run before vlhub (NO_EXCHANGE)

    def case(self, name: str) -> Path:
        case = self.tmp / name
        case.mkdir()
        self.prepare(case)
        return case

    def points(self) -> list[str]:
        """Run the command once in `tmp/count`, recording its commit points."""
        return _points(self.command(self.case("count")), self.tmp / "commit.log", prelude=self.prelude)

    def kill_at(self, label: str, case: Path) -> None:
        """Kill the command in `case` at the commit point `label` (counted by a first run if none was)."""
        if not (self.tmp / "count").exists():
            self.points()
        labels = [line.split(" ", 1)[1] for line in (self.tmp / "commit.log").read_text().splitlines()]
        _kill_at(labels.index(label) + 1, self.command(case), prelude=self.prelude)


ORDER = ["absent", "old", "aside", "journal", "new"]  # the states a run passes through, in order


def _kill_everywhere(scenario: Scenario) -> dict[str, str]:
    """Kill `scenario`'s command at each of its commit points and check (a), (b) and (c); the state each kill left,
    by point (`N label`)."""
    before = _digests(scenario.source)
    labels = scenario.points()
    cases = {n: scenario.case(f"kill-{n}") for n in range(1, len(labels) + 1) if scenario.only(n, labels)}
    assert cases, labels
    there = {n: {p.name for p in case.iterdir()} for n, case in cases.items()}
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda n: _kill_at(n, scenario.command(cases[n]), prelude=scenario.prelude), cases))
    states: dict[str, str] = {}
    for n, case in cases.items():
        point = f"{n} {labels[n - 1]}"
        state = states[point] = scenario.state(case)  # (a)
        args, settled = (scenario.again(case, state) if scenario.again
                         else (scenario.command(case), lambda case: scenario.state(case) == "new"))
        again = run_vlhub(*args)
        if again.returncode == 2 and "pass --overwrite" in again.stderr:  # what the user is told to do next
            again = run_vlhub(*args, "--overwrite")
        assert again.returncode == 0, f"after a kill at {point} that left {state}: {again.stderr}"
        assert settled(case), point
        assert _leftovers(case) == [], f"after a kill at {point} and a run again"  # (c)
        assert {p.name for p in case.iterdir()} == there[n] | {scenario.written}, point
    assert _digests(scenario.source) == before  # (b)
    assert _leftovers(scenario.tmp) == [] and _leftovers(scenario.source.parent) == []
    ranks = [ORDER.index(state) for state in states.values()]
    assert ranks == sorted(ranks), f"a later kill left an earlier state: {states}"
    return states


# --- the checkpoints ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source(module_tmp: Callable[[str], Path]) -> Path:
    """tiny-qwen2-vl's architecture with a 2048-token vocabulary, as `vlhub convert` writes it: 15 safetensors
    shards, an index, config files and a vlhub manifest."""
    out = small_sharded_source(module_tmp("kill-raw") / "raw", module_tmp("kill-source") / "src")
    assert len(list(out.glob("*.safetensors"))) > 10
    return out


@pytest.fixture(scope="module")
def pdparams_source(source: Path, module_tmp: Callable[[str], Path]) -> Path:
    out = module_tmp("kill-pdparams") / "src"
    converted = run_vlhub("convert", str(source), "--to", "paddle", "--out", str(out), "--max-shard-size", "300KB",
                          "--no-smoke")
    assert converted.returncode == 0, converted.stderr
    return out


class _Lazy(dict):
    """References whose "new" entry is read, when first asked for, from the command's first run."""

    def __init__(self, new: Callable[[], object], **known: object) -> None:
        super().__init__(known)
        self._new = new

    def items(self):  # type: ignore[override]
        if "new" not in self:
            self["new"] = self._new()
        return super().items()


# --- keys --in-place ------------------------------------------------------------------------------------------------


def _keys_in_place(checkpoint: Path, rename: list[str], back: list[str], tmp_path: Path, *,
                   prelude: str | None = None) -> Scenario:
    """`keys CASE/ck RENAME --in-place` on a copy of `checkpoint` (the source for (b) is the original)."""
    states = _Lazy(lambda: _digests(tmp_path / "count" / "ck"), old=_digests(checkpoint))
    original = _tensors(checkpoint)

    def again(case: Path, state: str) -> tuple[list[str], Callable[[Path], object]]:
        """From the old state the same command, to the new; from the new the same rename renames nothing (refused,
        exit 2): the next write there is the reverse rename, which gives the original tensors back."""
        if state == "old":
            return ["keys", str(case / "ck"), *rename, "--in-place"], lambda case: _checkpoint_state(
                case / "ck", states) == "new"
        return ["keys", str(case / "ck"), *back, "--in-place"], lambda case: _tensors(case / "ck") == original

    return Scenario(
        tmp=tmp_path,
        command=lambda case: ["keys", str(case / "ck"), *rename, "--in-place"],
        written="ck",
        prepare=lambda case: shutil.copytree(checkpoint, case / "ck"),
        state=lambda case: _checkpoint_state(case / "ck", states),
        again=again,
        source=checkpoint,
        prelude=prelude,
    )


def test_keys_in_place_killed_at_every_commit_point(source: Path, tmp_path: Path) -> None:
    """The issue's first case: killed between its renames, `keys --in-place` left the shards new and the index old.
    The checkpoint folder is now exchanged with a renamed copy in one step: old up to that step, new after."""
    states = _kill_everywhere(_keys_in_place(source, KEYS_RENAME, KEYS_BACK, tmp_path))
    assert [state for point, state in states.items() if point.endswith(EXCHANGE)] == ["old"]
    assert [state for point, state in states.items() if point.endswith(REMOVE_OLD)] == ["new"]


@pytest.fixture(scope="module")
def transformers_source(module_tmp: Callable[[str], Path]) -> Path:
    """The same model as transformers' `save_pretrained` leaves it: no vlhub manifest, transformers' own index."""
    return transformers_qwen2_vl(module_tmp("kill-transformers") / "raw")


def test_keys_in_place_of_a_checkpoint_transformers_saved_killed_at_every_commit_point(
        transformers_source: Path, tmp_path: Path) -> None:
    states = _kill_everywhere(_keys_in_place(transformers_source, KEYS_RENAME, KEYS_BACK, tmp_path))
    assert [state for point, state in states.items() if point.endswith(EXCHANGE)] == ["old"]
    assert [state for point, state in states.items() if point.endswith(REMOVE_OLD)] == ["new"]


def test_keys_in_place_of_pdparams_killed_at_every_commit_point(pdparams_source: Path, tmp_path: Path) -> None:
    states = _kill_everywhere(_keys_in_place(pdparams_source, PD_RENAME, PD_BACK, tmp_path))
    assert len(states) >= 4 and set(states.values()) == {"old", "new"}


def test_keys_in_place_killed_between_its_renames_without_exchange(source: Path, tmp_path: Path) -> None:
    """Where folders cannot be exchanged, the checkpoint is moved aside, then the renamed copy in: a kill between
    the two leaves no checkpoint, its files hidden in `.ck.vlhub-PID.old`. The same `keys --in-place` again must put
    it back before it judges the path missing (it failed on "no such file or directory" before 80e1ec5, leaving the
    user's only copy hidden), then rename it."""
    scenario = _keys_in_place(source, KEYS_RENAME, KEYS_BACK, tmp_path, prelude=NO_EXCHANGE)
    case = scenario.case("case")
    scenario.kill_at(PUBLISH_AFTER, case)
    assert not (case / "ck").exists()
    again = run_vlhub(*scenario.command(case))
    assert again.returncode == 0, again.stderr
    assert scenario.state(case) == "new"
    assert _leftovers(case) == []


def test_keys_in_place_killed_before_removing_the_old_copy_then_run_again(source: Path, tmp_path: Path) -> None:
    """The user runs the interrupted command again: it says the rename matches no key (the checkpoint is renamed
    already), and the old checkpoint, which the kill left beside it as `.ck.vlhub-PID.tmp`, goes all the same: every
    run that opens a checkpoint sweeps what killed runs left beside it."""
    scenario = _keys_in_place(source, KEYS_RENAME, KEYS_BACK, tmp_path)
    case = scenario.case("case")
    scenario.kill_at(REMOVE_OLD, case)
    assert scenario.state(case) == "new"
    again = run_vlhub(*scenario.command(case))
    assert again.returncode == 2 and "matches no key" in again.stderr, again.stderr
    assert _leftovers(case) == []


# --- convert --------------------------------------------------------------------------------------------------------


def _convert(source: Path, to: str, tmp_path: Path, *, overwrite: bool, prelude: str | None = None,
             only: Callable[[int, list[str]], bool] = lambda n, labels: True) -> Scenario:
    """`convert SRC --to TO --out CASE/out --no-smoke`, into a new folder or (`overwrite`) over an older output of
    the same source in float16."""
    def weights(out: Path) -> Path:
        if to != "paddle-inference":
            return out
        return out / json.loads((out / MANIFEST).read_text())["target"]["weights"]

    old = tmp_path / "old" / "out"
    made = run_vlhub("convert", str(source), "--to", to, "--out", str(old), "--no-smoke", "--dtype", "float16")
    assert made.returncode == 0, made.stderr
    references = _Lazy(lambda: _tensors(weights(tmp_path / "count" / "out")), old=_tensors(weights(old)))
    flags = ["--overwrite"] if overwrite else []

    def command(case: Path) -> list[str]:
        return ["convert", str(source), "--to", to, "--out", str(case / "out"), "--no-smoke", *flags]

    return Scenario(
        tmp=tmp_path,
        command=command,
        written="out",
        prepare=lambda case: overwrite and shutil.copytree(old, case / "out", symlinks=True),
        state=lambda case: _output_state(case / "out", references, weights),
        source=source,
        only=only,
        prelude=prelude,
    )


@pytest.mark.parametrize("to", ["safetensors", "paddle"])
@pytest.mark.parametrize("overwrite", [False, True], ids=["new --out", "--overwrite"])
def test_convert_killed_at_every_commit_point(source: Path, tmp_path: Path, to: str, overwrite: bool) -> None:
    """The issue's second case: `convert --overwrite` killed between its two renames left nothing under --out (the
    old output only as a hidden `.old` folder). The output folder is now exchanged with its replacement in one step:
    the old output up to that step, the new one after; a new --out is published by one rename."""
    states = _kill_everywhere(_convert(source, to, tmp_path, overwrite=overwrite))
    if overwrite:
        assert [state for point, state in states.items() if point.endswith(EXCHANGE)] == ["old"]
        assert [state for point, state in states.items() if point.endswith(REMOVE_OLD)] == ["new"]
        assert "absent" not in states.values()
    else:
        assert [state for point, state in states.items() if point.endswith("publish a new directory")] == ["absent"]


def test_convert_overwrite_without_exchange_is_put_back_by_the_next_run(source: Path, tmp_path: Path) -> None:
    """Where folders cannot be exchanged, `convert --overwrite` moves the old output aside, then the new one in. A
    kill between the two leaves --out missing, the old output in `.out.vlhub-PID.old` (as vlhub.atomic.swap_in
    says); the next run that writes there puts it back first: the same command again (a new output), or the
    command without --overwrite (refused: the old output is back and not empty)."""
    scenario = _convert(source, "paddle", tmp_path, overwrite=True, prelude=NO_EXCHANGE,
                        only=lambda n, labels: labels[n - 1] in (EXCHANGE, SET_ASIDE, PUBLISH_AFTER, REMOVE_OLD))
    states = _kill_everywhere(scenario)
    assert list(states.values()) == ["old", "old", "aside", "new"], states

    case = scenario.case("without --overwrite")
    scenario.kill_at(PUBLISH_AFTER, case)
    assert scenario.state(case) == "aside"  # the documented window of the fallback
    refused = run_vlhub(*scenario.command(case)[:-1])
    assert refused.returncode == 2 and "exists and is not empty" in refused.stderr, refused.stderr
    assert scenario.state(case) == "old"
    assert _leftovers(case) == []


def test_paddle_inference_overwrite_killed_where_the_output_changes(source: Path, tmp_path: Path) -> None:
    """`convert --to paddle-inference --overwrite` (no smoke test; each kill is a fresh interpreter importing Paddle,
    seconds): killed at the two steps that change what --out holds, the exchange and the removal of the old layout
    (the steps before are in the staging folder, the one after is the manifest's verdict, as for the other
    conversions)."""
    states = _kill_everywhere(_convert(source, "paddle-inference", tmp_path, overwrite=True,
                                       only=lambda n, labels: labels[n - 1] in (EXCHANGE, REMOVE_OLD)))
    assert list(states.values()) == ["old", "new"], states


# --- dump-embeddings ------------------------------------------------------------------------------------------------


def _dump(source: Path, tmp_path: Path, *, overwrite: bool) -> Scenario:
    """`dump-embeddings SRC --out CASE/emb/embed_tokens.bin --lm-head`, into an empty folder or (`overwrite`) over
    an earlier float32 dump."""
    old = tmp_path / "old"
    old.mkdir()
    if overwrite:
        made = run_vlhub("dump-embeddings", str(source), "--out", str(old / "embed_tokens.bin"), "--lm-head",
                         "--dtype", "float32")
        assert made.returncode == 0, made.stderr
    references = _Lazy(lambda: _tables({name: tmp_path / "count" / "emb" / name for name in TABLES}),
                       **({"old": _tables({name: old / name for name in TABLES})} if overwrite else {}))
    flags = ["--overwrite"] if overwrite else []

    def command(case: Path) -> list[str]:
        return ["dump-embeddings", str(source), "--out", str(case / "emb" / "embed_tokens.bin"), "--lm-head", *flags]

    return Scenario(
        tmp=tmp_path,
        command=command,
        written="emb",
        prepare=lambda case: shutil.copytree(old, case / "emb") if overwrite else (case / "emb").mkdir(),
        state=lambda case: _dump_state(case / "emb", references),
        source=source,
    )


@pytest.mark.parametrize("overwrite", [False, True], ids=["new files", "--overwrite"])
def test_dump_embeddings_killed_at_every_commit_point(source: Path, tmp_path: Path, overwrite: bool) -> None:
    """The tables and their sidecars are renamed into place behind a journal: a kill between two renames leaves
    the journal, and the next run that writes there (with --overwrite: see the next test) finishes them first."""
    states = _kill_everywhere(_dump(source, tmp_path, overwrite=overwrite))
    assert list(states.values()) == ["old" if overwrite else "absent", "journal", "journal", "journal", "new"], states


def test_dump_embeddings_killed_mid_commit_then_run_again(source: Path, tmp_path: Path) -> None:
    """A first dump killed after embed_tokens.bin was renamed into place, before its sidecar and lm_head: the same
    command again (no --overwrite) completes the journal first, whatever it then says about the files being there.
    Before 80e1ec5 it refused (embed_tokens.bin exists) before completing it, leaving a table without its sidecar,
    no lm_head, and the journal and temporaries beside them."""
    scenario = _dump(source, tmp_path, overwrite=False)
    case = scenario.case("case")
    scenario.kill_at("rename embed_tokens.json into place", case)
    assert scenario.state(case) == "journal"
    run_vlhub(*scenario.command(case))  # the same command again
    assert scenario.state(case) == "new"
    assert _leftovers(case) == []


def test_dump_embeddings_killed_while_writing_lm_head(tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    """Killed once lm_head.bin's temporary exists, so after embed_tokens.json's was written and before the journal
    (tiny-qwen2-vl's 39 MB lm_head takes a tenth of a second to write): the run again removes every temporary, the
    sidecar's too (before 80e1ec5 the sweep looked only for the tables' names, and `.embed_tokens.json.vlhub-PID.tmp`
    stayed for good)."""
    scenario = _dump(tiny_qwen2_vl, tmp_path, overwrite=False)
    scenario.points()
    case = scenario.case("case")
    process = subprocess.Popen([sys.executable, "-m", "vlhub", *scenario.command(case)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not list((case / "emb").glob(".lm_head.bin.vlhub-*.tmp")) and process.poll() is None:
        time.sleep(0.0005)
    process.kill()
    assert process.wait() == -9, "finished before it could be killed"
    assert scenario.state(case) == "absent"
    again = run_vlhub(*scenario.command(case))
    assert again.returncode == 0, again.stderr
    assert scenario.state(case) == "new"
    assert _leftovers(case) == []
