"""Shared by the benchmark scripts: full-size synthetic checkpoints and measured child processes."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vlhub.catalog import get_model
from vlhub.hub.synthetic import write_synthetic_checkpoint

# the official Qwen2(.5)-VL uploads cut shards at about 4 GB
OFFICIAL_SHARD_SIZE = 4 * 10**9


def full_size_checkpoint(model: str, root: Path, *, format: str | None = None) -> Path:
    """A checkpoint with random weights in the official shapes, dtype and sharding (made once), in the
    family's own format or in `format` (then in a directory named after it: `qwen2-vl-2b-pdparams`)."""
    spec = get_model(model)
    out = root / (f"{model}-{format}" if format else model)
    if not (out / "config.json").is_file():
        print(f"generating {model} ({spec.size_bytes / 1e9:.1f} GB) in {out} ...", file=sys.stderr)
        write_synthetic_checkpoint(out, spec.family, spec.config, format=format, max_shard_size=OFFICIAL_SHARD_SIZE)
    return out


def drop_page_cache() -> bool:
    """Start cold when the machine lets us (root on Linux); report whether it did."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


@dataclass
class Run:
    seconds: float
    peak_rss_bytes: int
    stdout: str


def measure(argv: list[str], *, cold: bool = True) -> Run:
    """Run a command in a child process; wall time and the child's peak resident memory.

    The command is started by a fresh interpreter running this file: a child forked straight from a
    benchmark that has just generated 16 GB would inherit that process's peak RSS figure.
    """
    if cold:
        drop_page_cache()
    result = subprocess.run([sys.executable, __file__, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{argv} failed:\n{result.stderr}")
    *_, last = result.stderr.strip().splitlines()
    seconds, peak = last.split()
    return Run(float(seconds), int(peak), result.stdout)


def _run_and_report(argv: list[str]) -> int:
    start = time.perf_counter()
    child = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    print(f"{time.perf_counter() - start:.6f} {usage.ru_maxrss * 1024}", file=sys.stderr)
    return os.waitstatus_to_exitcode(status)


CP_BASELINE = "`cp -r` (baseline)"


def against_cp(source: Path, command: Callable[[Path], str], name: str, *, rounds: int, scratch: Path) -> None:
    """Run `command(out)` and `cp -r source out` in interleaved cold rounds (each followed by sync, so a
    write counts once it is on disk) and print a markdown table with the median of per-round ratios:
    this disk is noisy, and two runs made back to back share its mood. The order alternates from round to round
    (the first command of a benchmark was measured slower here whichever it was)."""
    commands = {name: command, CP_BASELINE: lambda out: f"cp -r '{source}' '{out}'"}
    results: dict[str, list[Run]] = {label: [] for label in commands}
    for round_number in range(rounds):
        for label, make in sorted(commands.items(), key=lambda item: (item[0] == name) == (round_number % 2 == 0)):
            with tempfile.TemporaryDirectory(dir=scratch) as directory:
                results[label].append(measure(["sh", "-c", f"{make(Path(directory) / 'out')} && sync"]))
            subprocess.run(["sync"], check=True)
    baseline = results[CP_BASELINE]
    print("| command | median time | peak RSS | median of per-round ratios to cp | all runs (s) |")
    print("|---|---|---|---|---|")
    for label, runs in results.items():
        seconds = statistics.median(r.seconds for r in runs)
        ratio = statistics.median(r.seconds / cp.seconds for r, cp in zip(runs, baseline))
        peak = max(r.peak_rss_bytes for r in runs)
        print(f"| {label} | {seconds:.1f} s | {peak / 1e6:,.0f} MB | {ratio:.2f}x | "
              f"{', '.join(f'{r.seconds:.1f}' for r in runs)} |")


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


if __name__ == "__main__":
    sys.exit(_run_and_report(sys.argv[1:]))
