"""`vlhub convert --to paddle-inference` of a full-size checkpoint: time and peak memory, with and without
the smoke test, against `cp -r` of the source.

    python benchmarks/bench_paddle_inference.py [--model qwen2-vl-2b] [--data DIR] [--rounds N]

The checkpoint (random bf16 weights in the official shapes and sharding) is generated once. Each round
starts with a cold page cache and runs, in fresh processes: the conversion with its smoke test (weights,
static graphs, then paddle.inference against the numpy reference), the conversion with `--no-smoke`, and
`cp -r` of the source. Outputs are deleted after each run; the layout needs twice the model's size on disk.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from _harness import full_size_checkpoint, measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="qwen2-vl-2b")
    parser.add_argument("--data", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    source = full_size_checkpoint(args.model, args.data)
    out = args.data / f"{args.model}-paddle-inference"
    commands = {
        "`vlhub convert --to paddle-inference` (with smoke test)":
            ["vlhub", "convert", str(source), "--to", "paddle-inference", "--out", str(out), "--json"],
        "`vlhub convert --to paddle-inference --no-smoke`":
            ["vlhub", "convert", str(source), "--to", "paddle-inference", "--out", str(out), "--no-smoke"],
        "`cp -r` of the source (baseline)": ["cp", "-r", str(source), str(out)],
    }
    runs: dict[str, list] = {label: [] for label in commands}
    for _ in range(args.rounds):
        for label, argv in commands.items():
            runs[label].append(measure(["sh", "-c", " ".join(f"'{a}'" for a in argv) + " && sync"]))
            shutil.rmtree(out, ignore_errors=True)
    print(f"{args.model}-shaped ({source}); {args.rounds} cold round(s)\n")
    print("| command | median time | peak RSS | all runs (s) | smoke |")
    print("|---|---|---|---|---|")
    for label, measured in runs.items():
        verdict = ""
        if "--json" in commands[label]:
            smoke = json.loads(measured[0].stdout)["smoke"]
            verdict = f"{'passed' if smoke['passed'] else 'FAILED'} (rel. diff {smoke['stages'][1]['relative']:.1e})"
        print(f"| {label} | {statistics.median(r.seconds for r in measured):.1f} s | "
              f"{max(r.peak_rss_bytes for r in measured) / 1e9:.2f} GB | "
              f"{', '.join(f'{r.seconds:.1f}' for r in measured)} | {verdict} |")


if __name__ == "__main__":
    main()
