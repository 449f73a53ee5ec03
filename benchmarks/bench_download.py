"""`vlhub download` of a Qwen2-VL-2B-shaped checkpoint (4.4 GB) from a local fake Hub, against `hf download`.

    flock /tmp/vlhub-bench.lock python benchmarks/bench_download.py [--data DIR] [--rounds N] [--model NAME]

The checkpoint (random bf16 weights, official shapes and shards) is generated once and served as its official
repo id by `tests/fake_hub.py`, a real HTTP server on 127.0.0.1 running in this process (it holds the files in
memory). Each round runs, in fresh processes and alternating order, `vlhub download MODEL` and the plain client
(`hf download REPO`, huggingface_hub's snapshot_download), each into a fresh empty HF_HOME on the same disk as
the data (deleted afterwards), after two references: `cp -r` of the checkpoint (the disk) and `curl -o` of its
largest shard from the same server (the server). Every command is followed by `sync` (a write is not done until
it is on disk), the page cache is dropped before each when the machine lets us (root), and every download is
compared file by file (sha256) with the source. vlhub hashes every file while writing it; the plain client only
checks sizes: that difference is what the table shows.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import shlex
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from _harness import Run, drop_page_cache, full_size_checkpoint, measure

from vlhub.catalog import get_model

VLHUB, HF, CP, CURL = "`vlhub download`", "`hf download`", "`cp -r` (disk reference)", "`curl -o` largest shard"


@dataclass
class Tool:
    """A command to time: `command(home)` is its shell line, `output(home)` where its copy lands."""

    label: str
    command: Callable[[Path], str]
    output: Callable[[Path], Path]
    expected: dict[str, str]  # relative path -> sha256 of what must land in `output`
    size: int  # bytes it moves
    env: Callable[[Path], dict[str, str]] | None = None
    runs: list[Run] = field(default_factory=list)


def script(name: str) -> str:
    """The console script installed beside this interpreter (not a pyenv shim), else the bare name."""
    path = Path(sysconfig.get_path("scripts")) / name
    return str(path) if path.is_file() else name


def sha256_of(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def tree_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every regular file under `directory` (symlinks followed), by relative path."""
    return {p.relative_to(directory).as_posix(): sha256_of(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def snapshot(home: Path, repo_id: str) -> Path:
    """The one snapshot directory a download left in the Hugging Face cache under `home`."""
    snapshots = list((home / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots").glob("*"))
    if len(snapshots) != 1:
        raise RuntimeError(f"expected one snapshot of {repo_id} under {home}, found {snapshots}")
    return snapshots[0]


def check_identical(tool: Tool, out: Path) -> None:
    """Fail loudly unless `out` holds exactly the expected files with the expected sha256."""
    got = tree_hashes(out) if out.is_dir() else {out.name: sha256_of(out)}
    if got != tool.expected:
        wrong = sorted(set(got.items()) ^ set(tool.expected.items()))
        raise RuntimeError(f"{tool.label}: {out} differs from the source: {wrong}")


def hub_env(url: str, home: Path) -> dict[str, str]:
    return {"HF_ENDPOINT": url, "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def run_once(tool: Tool, scratch: Path) -> bool:
    """One cold, synced run of `tool` into a fresh directory, checked and deleted; whether the cache was dropped."""
    with tempfile.TemporaryDirectory(dir=scratch, prefix=".bench-download-") as directory:
        home = Path(directory)
        assignments = [f"{k}={v}" for k, v in (tool.env(home) if tool.env else {}).items()]
        # an inherited HF_HUB_CACHE would win over HF_HOME, HF_HUB_OFFLINE would stop both clients
        argv = ["env", "-u", "HF_HUB_CACHE", "-u", "HF_HUB_OFFLINE", *assignments,
                "sh", "-c", f"{tool.command(home)} && sync"]
        dropped = drop_page_cache()
        tool.runs.append(measure(argv, cold=False))
        check_identical(tool, tool.output(home))
    subprocess.run(["sync"], check=True)
    return dropped


def print_table(tools: list[Tool]) -> None:
    """Markdown: medians, spread, throughput, peak memory and the median of per-round ratios to `hf download`."""
    hf = next(t for t in tools if t.label == HF)
    print("| tool | median time | min-max | MB/s (median) | peak RSS (max) | median per-round ratio to hf | "
          "all runs (s) |")
    print("|---|---|---|---|---|---|---|")
    for tool in tools:
        seconds = [r.seconds for r in tool.runs]
        rate = statistics.median(tool.size / 1e6 / s for s in seconds)
        ratio = "- (other bytes)"
        if tool.size == hf.size:
            ratio = f"{statistics.median(r.seconds / h.seconds for r, h in zip(tool.runs, hf.runs, strict=True)):.2f}x"
        peak = max(r.peak_rss_bytes for r in tool.runs)
        print(f"| {tool.label} | {statistics.median(seconds):.1f} s | {min(seconds):.1f}-{max(seconds):.1f} s | "
              f"{rate:,.0f} | {peak / 1e6:,.0f} MB | {ratio} | {', '.join(f'{s:.1f}' for s in seconds)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="qwen2-vl-2b", help="a catalog name (default: qwen2-vl-2b)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the test suite's fake Hub
    from tests.fake_hub import FakeHub

    spec = get_model(args.model)
    repo_id = spec.hf_repo
    assert repo_id is not None, f"{args.model} has no Hugging Face repo"
    source = full_size_checkpoint(args.model, args.data)
    hashes = tree_hashes(source)
    total = sum((source / name).stat().st_size for name in hashes)
    largest = max((source / name for name in hashes), key=lambda p: p.stat().st_size)

    with contextlib.closing(FakeHub()) as hub:
        hub.add_directory(repo_id, source)
        shard_url = f"{hub.url}/{repo_id}/resolve/main/{largest.name}"
        q = shlex.quote
        tools = [
            Tool(VLHUB, lambda home: f"{q(script('vlhub'))} download {q(args.model)}",
                 lambda home: snapshot(home, repo_id), hashes, total,
                 lambda home: hub_env(hub.url, home) | {"VLHUB_HOME": str(home / "vlhub")}),
            Tool(HF, lambda home: f"{q(script('hf'))} download {q(repo_id)}",
                 lambda home: snapshot(home, repo_id), hashes, total, lambda home: hub_env(hub.url, home)),
            Tool(CP, lambda home: f"cp -r {q(str(source))} {q(str(home / 'out'))}", lambda home: home / "out",
                 hashes, total),
            Tool(CURL, lambda home: f"curl -sS --fail -o {q(str(home / largest.name))} {q(shard_url)}",
                 lambda home: home / largest.name, {largest.name: hashes[largest.name]}, largest.stat().st_size),
        ]
        dropped: list[bool] = []
        references, downloads = tools[2:], tools[:2]
        for round_ in range(args.rounds):
            # the references first, then the two downloads in alternating order: each download follows the same
            # command as often as the other (the disk and the kernel's free memory remember the previous run)
            for tool in references + (downloads if round_ % 2 == 0 else downloads[::-1]):
                dropped.append(run_once(tool, args.data))
                print(f"round {round_ + 1}: {tool.label} {tool.runs[-1].seconds:.1f} s", file=sys.stderr, flush=True)

    cache = f"dropped before {sum(dropped)} of {len(dropped)} runs"
    if all(dropped):
        cache = "dropped before every run"
    elif not any(dropped):
        cache = "NOT dropped (not root?): what cp reads is hot after the first round"
    print(f"\n{spec.name}-shaped safetensors ({total / 1e9:.1f} GB, {len(hashes)} files) served as {repo_id} by "
          f"tests/fake_hub.py on 127.0.0.1 (in memory); {args.rounds} round(s), the two downloads in alternating order; each run into a "
          f"fresh HF_HOME on the data disk, followed by sync, checked byte-identical (sha256); page cache {cache}. "
          f"MB/s = 10^6 bytes/s of the whole checkpoint ({largest.name}, {largest.stat().st_size / 1e9:.2f} GB, for "
          "curl).\n")
    print_table(tools)


if __name__ == "__main__":
    main()
