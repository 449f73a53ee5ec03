"""Killed runs, then a run again: what each writing command leaves (issue 19's stress test).

    flock /tmp/vlhub-bench.lock python benchmarks/bench_faults.py [--data DIR] [--kills 50] [--seed 0]
        [--command NAME ...]

Generates once a 324 MB checkpoint (tiny-qwen2-vl's architecture at hidden size 512: 58 bf16 tensors in four
safetensors shards with an index), then for each command runs it `--kills` times as a fresh `python -m vlhub`
process and sends it a signal at a random instant (seeded): SIGKILL nine times in ten, else SIGTERM or SIGINT. Four
instants in five are drawn while the command writes: from the moment its lock file appears, uniformly over 110 % of
the time an uninterrupted run holds its lock (the median of three, measured first); the others uniformly over the
start-up before it, from the moment the interpreter is up (Python's own start-up, site and the .pth files of
site-packages, ~30 ms before any vlhub code runs, is left out: a signal there is Python's traceback to print).
After each signal the written path is checked, then the same command runs again (a run that is refused because the
killed one had already finished counts as the run again), and the folder is checked once more.

Commands, each on its own output (outputs alternate between new and --overwrite over the previous one):
`convert --to paddle`, `convert --to safetensors`, `convert --to paddle-inference` (all `--no-smoke
--overwrite`), `dump-embeddings --lm-head --overwrite`, and `keys --in-place` on a copy of the checkpoint
(renaming to the transformers-5 layout, or back when the copy is renamed already).

Columns: runs; signalled while writing (the command's lock file was there when the signal was sent; the others hit
the start-up or came after the end); partial outputs (after the signal, the path is neither absent nor a complete
output: every file its manifest lists, as listed, every tensor readable; a dump is complete when each table matches
its sidecar's sha256, or when the journal of its interrupted commit completes it; for keys --in-place, the checkpoint
is not exactly the original or exactly the renamed one); corrupted sources (the source's files are not
byte-identical afterwards; for keys --in-place, whose source is what it rewrites, its tensors are not the original
ones under either naming); leftover bytes after the run again (vlhub temporaries and lock files, `.NAME.vlhub-*` and
`.NAME.vlhub.lock`, whose owner is gone, anywhere in the command's folder or beside the source, each counted once);
tracebacks ("Traceback" on the stderr of any run, killed or again). Every column but the first two should be 0.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlhub.catalog import get_model
from vlhub.formats.readers import open_checkpoint
from vlhub.hub.synthetic import write_synthetic_checkpoint
from vlhub.manifest import MANIFEST

FORWARD = ["--rename", "visual.=model.visual.", "--rename", "model.=model.language_model."]
BACK = ["--rename", "model.visual.=visual.", "--rename", "model.language_model.=model."]
TABLES = ("embed_tokens.bin", "embed_tokens.json", "lm_head.bin", "lm_head.json")
SIGNALS = [signal.SIGKILL] * 18 + [signal.SIGTERM, signal.SIGINT]
# `python -m vlhub`, saying `ready` once the interpreter is up: a signal in Python's own start-up (site and the .pth
# files of site-packages, ~30 ms, before any vlhub code runs) is Python's to report, so instants count from there
LAUNCH = "print('ready', flush=True)\nimport runpy\nrunpy.run_module('vlhub', run_name='__main__', alter_sys=True)"


def checkpoint(data: Path) -> Path:
    """tiny-qwen2-vl's architecture at hidden size 512 (its vision merger's output too; M-RoPE sections for head
    size 128): 324 MB, most of it the two [151936, 512] tables; made once, in a folder of this benchmark's own (what
    is beside it is this benchmark's to count)."""
    out = data / "faults" / "qwen2-vl-h512"
    if not (out / "config.json").is_file():
        spec = get_model("tiny-qwen2-vl")
        config = copy.deepcopy(spec.config)
        config.update(hidden_size=512, intermediate_size=1024)
        config["vision_config"]["hidden_size"] = 512
        config["rope_scaling"]["mrope_section"] = [16, 24, 24]
        print(f"generating {out} ...", file=sys.stderr)
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        write_synthetic_checkpoint(staging, spec.family, config, max_shard_size=100_000_000)
        staging.rename(out)
    return out


# --- what a path holds ----------------------------------------------------------------------------------------------


def owned(name: str) -> bool:
    return ".vlhub-" in name or name.endswith(".vlhub.lock")


def leftovers(folder: Path, source: Path) -> dict[Path, int]:
    """vlhub temporaries and lock files anywhere under `folder` or `source`, or beside `source`, with their bytes (a
    temporary folder's files counted); a temporary whose owner still runs is not left over (yet)."""
    found = [*folder.rglob("*"), *source.rglob("*"), *source.parent.iterdir()]
    return {path: _size(path) for path in found if owned(path.name) and not running(path.name)}


def running(name: str) -> bool:
    """Whether the temporary `name` (`.NAME.vlhub-PID.KIND`) belongs to a process that still runs."""
    owner = re.fullmatch(r"\..+\.vlhub-(\d+)\.[a-z]+", name)
    return owner is not None and Path(f"/proc/{owner[1]}").exists()


def _size(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir() or p.is_symlink())


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` but vlhub's temporaries and locks."""
    found = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.is_file() and not any(owned(part) for part in relative.parts):
            found[relative.as_posix()] = sha256(path)
    return found


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def tensors(path: Path) -> dict[str, str]:
    """Every tensor read through vlhub's reader (a failure is a partial output), by its bytes' sha256."""
    with open_checkpoint(path, bf16=False) as opened:
        return {name: hashlib.sha256(np.ascontiguousarray(opened.read(name)).tobytes()).hexdigest()
                for name in opened.tensors}


def complete_output(out: Path, weights: Callable[[Path], Path] = lambda out: out) -> bool:
    """Absent, or every file its manifest lists as listed, nothing else, and every tensor readable."""
    if not out.exists():
        return True
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        found = {name: digest for name, digest in digests(out).items() if name != MANIFEST}
        if sorted(found) != sorted(manifest["files"]):
            return False
        if any(found[name] != entry["sha256"] or (out / name).stat().st_size != entry["size"]
               for name, entry in manifest["files"].items()):
            return False
        tensors(weights(out))
        return True
    except Exception:  # noqa: BLE001 - anything unreadable is what this counts
        return False


def complete_dump(folder: Path) -> bool:
    """No table, or both tables matching their sidecars, or a journal whose renames give that."""
    files = {name: folder / name for name in TABLES if (folder / name).exists()}
    if not files or tables_match(files):
        return True
    for journal in folder.glob(".*.vlhub-*.journal"):
        moves = json.loads(journal.read_text())["moves"]
        return tables_match({**files, **{final: folder / temp for temp, final in moves if (folder / temp).exists()}})
    return False


def tables_match(files: dict[str, Path]) -> bool:
    if sorted(files) != sorted(TABLES):
        return False
    for table in ("embed_tokens", "lm_head"):
        sidecar = json.loads(files[f"{table}.json"].read_text())
        data = files[f"{table}.bin"]
        if sidecar["sha256"] != sha256(data) or sidecar["size"] != data.stat().st_size:
            return False
    return True


# --- the commands ---------------------------------------------------------------------------------------------------


@dataclass
class Command:
    """One row: how to run it (given the run's number), its lock file, and the checks."""

    name: str
    args: Callable[[int], list[str]]
    lock: Path
    prepare: Callable[[int], None]  # before run i (e.g. remove the output for a new one)
    partial: Callable[[], bool]  # after a signal: is the path partial?
    corrupted: Callable[[], bool]  # is the source changed?
    folder: Path  # where leftovers are counted (and under and beside the source)
    left: dict[Path, int] = field(default_factory=dict)  # every leftover seen after a run again (counted once)
    rows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("runs", "signalled while writing", "partial outputs", "corrupted sources", "leftover bytes after rerun",
         "tracebacks"), 0))


def commands(source: Path, work: Path) -> list[Command]:
    before = digests(source)

    def source_changed() -> bool:
        return digests(source) != before

    def output(name: str, to: str, weights: Callable[[Path], Path] = lambda out: out) -> Command:
        folder = work / name
        folder.mkdir(parents=True, exist_ok=True)
        out = folder / "out"
        return Command(
            f"`convert --to {to}`",
            lambda i: ["convert", str(source), "--to", to, "--out", str(out), "--no-smoke", "--overwrite"],
            folder / ".out.vlhub.lock",
            lambda i: shutil.rmtree(out) if i % 2 == 0 and out.exists() else None,
            lambda: not complete_output(out, weights),
            source_changed,
            folder)

    def inference_weights(out: Path) -> Path:
        return out / json.loads((out / MANIFEST).read_text())["target"]["weights"]

    emb = work / "dump-embeddings"
    emb.mkdir(parents=True, exist_ok=True)

    def clear_dump(i: int) -> None:
        if i % 2 == 0:
            for name in TABLES:
                (emb / name).unlink(missing_ok=True)

    keys = work / "keys" / "ck"
    shutil.copytree(source, keys)
    original = tensors(source)
    states = {}  # the checkpoint as vlhub writes it with its official names, and renamed: from two runs first
    for state, rename in (("renamed", FORWARD), ("original", BACK)):
        if run(["keys", str(keys), *rename, "--in-place"]).returncode != 0:
            raise RuntimeError(f"keys {rename} failed")
        states[state] = digests(keys)

    def keys_args(i: int) -> list[str]:
        return ["keys", str(keys), *(FORWARD if digests(keys) == states["original"] else BACK), "--in-place"]

    def keys_partial() -> bool:
        return not keys.is_dir() or digests(keys) not in states.values()

    def keys_corrupted() -> bool:
        try:
            return sorted(tensors(keys).values()) != sorted(original.values())
        except Exception:  # noqa: BLE001
            return True

    return [
        output("convert-paddle", "paddle"),
        output("convert-safetensors", "safetensors"),
        Command("`keys --in-place`", keys_args, keys.parent / ".ck.vlhub.lock", lambda i: None, keys_partial,
                keys_corrupted, keys.parent),
        Command("`dump-embeddings --lm-head`",
                lambda i: ["dump-embeddings", str(source), "--out", str(emb / "embed_tokens.bin"), "--lm-head",
                           "--overwrite"],
                emb / ".embed_tokens.bin.vlhub.lock", clear_dump, lambda: not complete_dump(emb), source_changed,
                emb),
        output("convert-paddle-inference", "paddle-inference", inference_weights),
    ]


# --- running ---------------------------------------------------------------------------------------------------------


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vlhub", *args], capture_output=True, text=True, check=False)


def launched(args: list[str]) -> subprocess.Popen[str]:
    """`vlhub ARGS` in a fresh interpreter, returned once the interpreter is up (see LAUNCH)."""
    process = subprocess.Popen([sys.executable, "-c", LAUNCH, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    assert process.stdout is not None
    if process.stdout.readline() != "ready\n":
        raise RuntimeError(f"the interpreter did not start: {process.communicate()[1]}")
    return process


def timed(args: list[str], lock: Path) -> tuple[float, float]:
    """An uninterrupted run: seconds from the interpreter's start-up until its lock file appeared, and until it
    ended."""
    process = launched(args)
    start = time.perf_counter()
    locked = None
    while process.poll() is None:
        if locked is None and lock.exists():
            locked = time.perf_counter() - start
        time.sleep(0.002)
    ended = time.perf_counter() - start
    _, stderr = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{args} failed: {stderr}")
    return locked or 0.0, ended


def signalled(args: list[str], lock: Path, delay: float, signum: int, *, from_lock: bool) -> tuple[str, bool, int]:
    """Run, send `signum` `delay` seconds after its interpreter was up (or, `from_lock`, after its lock file
    appeared), unless it ended first; its stderr, whether its lock file was there when the signal went, and its exit
    status."""
    process = launched(args)
    while from_lock and not lock.exists() and process.poll() is None:
        time.sleep(0.001)
    try:
        process.wait(delay)
        writing = False
    except subprocess.TimeoutExpired:
        writing = lock.exists()
        process.send_signal(signum)
    _, stderr = process.communicate()
    return stderr, writing, process.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--kills", type=int, default=50, help="signalled runs per command")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--command", action="append", help="only the commands whose name contains this")
    args = parser.parse_args()
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in the background: let the children get Ctrl-C
        signal.signal(signal.SIGINT, signal.default_int_handler)
    source = checkpoint(args.data)
    work = source.parent / "work"
    shutil.rmtree(work, ignore_errors=True)
    chosen = [c for c in commands(source, work) if not args.command or any(n in c.name for n in args.command)]
    size = sum(p.stat().st_size for p in source.iterdir())
    print(f"{source.name}: {size / 1e6:.0f} MB; {args.kills} signalled runs per command (seed {args.seed}), each "
          "followed by a run again\n", file=sys.stderr)
    rng = random.Random(args.seed)
    tracebacks = work / "tracebacks"
    for command in chosen:
        runs = []
        for i in range(3):  # the median of three uninterrupted runs
            command.prepare(1)
            runs.append(timed(command.args(i), command.lock))
        locked, ended = sorted(runs, key=lambda run: run[1] - run[0])[1]
        for i in range(args.kills):
            command.prepare(i)
            argv = command.args(i)
            from_lock = rng.random() < 0.8
            delay = rng.uniform(0, (ended - locked) * 1.1) if from_lock else rng.uniform(0, locked)
            signum = rng.choice(SIGNALS)
            stderr, writing, status = signalled(argv, command.lock, delay, signum, from_lock=from_lock)
            rows = command.rows
            rows["runs"] += 1
            rows["signalled while writing"] += writing
            rows["tracebacks"] += "Traceback" in stderr
            partial = command.partial()
            rows["partial outputs"] += partial
            again = run(argv)
            rows["tracebacks"] += "Traceback" in again.stderr
            rows["corrupted sources"] += command.corrupted()
            found = leftovers(command.folder, source)
            leftover = sum(size for path, size in found.items() if path not in command.left)
            command.left.update(found)
            rows["leftover bytes after rerun"] = sum(command.left.values())
            if partial or leftover or "Traceback" in stderr + again.stderr or again.returncode not in (0, 2):
                when = f"{delay:.2f} s after {'its lock appeared' if from_lock else 'it started'}"
                print(f"{command.name} run {i}: {signal.Signals(signum).name} {when} (exit {status}), "
                      f"partial={partial}, leftover={leftover} B, again: exit {again.returncode}", file=sys.stderr)
                if "Traceback" in stderr + again.stderr:
                    tracebacks.mkdir(parents=True, exist_ok=True)
                    saved = tracebacks / f"{command.folder.name}-{i}.txt"
                    saved.write_text(f"{argv}\n--- signalled ---\n{stderr}\n--- again ---\n{again.stderr}")
                    print(f"  stderr in {saved}", file=sys.stderr)
        print(f"{command.name}: done ({command.rows})", file=sys.stderr)
    print("| command | runs | signalled while writing | partial outputs | corrupted sources | "
          "leftover bytes after rerun | tracebacks |")
    print("|---|---|---|---|---|---|---|")
    for command in chosen:
        print(f"| {command.name} | " + " | ".join(f"{value:,}" for value in command.rows.values()) + " |")


if __name__ == "__main__":
    main()
