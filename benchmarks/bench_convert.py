"""`vlhub convert` of a full-size Qwen2-VL-7B-shaped checkpoint (16.6 GB) to Paddle, against `cp -r`.

    python benchmarks/bench_convert.py [--data DIR] [--rounds N]

The checkpoint (random bf16 weights, official shapes and five ~4 GB shards) is generated once. Each
round runs `vlhub convert SRC --to paddle` and `cp -r SRC` of the same bytes in fresh processes with a
cold page cache, each followed by `sync` (the write is not done until it is on disk); the medians
are reported with every run and the peak resident memory of each command.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from _harness import full_size_checkpoint, measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    source = full_size_checkpoint("qwen2-vl-7b", args.data)
    commands = {
        "`vlhub convert --to paddle`": lambda out: ["sh", "-c", f"vlhub convert '{source}' --to paddle "
                                                             f"--out '{out}' 2>/dev/null && sync"],
        "`cp -r` (baseline)": lambda out: ["sh", "-c", f"cp -r '{source}' '{out}' && sync"],
    }
    results: dict[str, list] = {name: [] for name in commands}
    for _ in range(args.rounds):
        for name, command in commands.items():
            with tempfile.TemporaryDirectory(dir=args.data) as scratch:
                results[name].append(measure(command(Path(scratch) / "out")))
            subprocess.run(["sync"], check=True)
    # the disk is noisy: each round's ratio compares two runs made back to back; report their median
    baseline = "`cp -r` (baseline)"
    ratios = sorted(vl.seconds / cp.seconds for vl, cp in zip(results["`vlhub convert --to paddle`"], results[baseline]))
    print(f"Qwen2-VL-7B-shaped safetensors (16.6 GB) -> pdparams; {args.rounds} cold rounds, each command "
          "followed by sync\n")
    print("| command | median time | peak RSS | median of per-round ratios to cp | all runs (s) |\n|---|---|---|---|---|")
    for name, runs in results.items():
        times = sorted(r.seconds for r in runs)
        peak = max(r.peak_rss_bytes for r in runs)
        ratio = f"{ratios[len(ratios) // 2]:.2f}x" if name != baseline else "1.00x"
        all_runs = ", ".join(f"{r.seconds:.1f}" for r in runs)
        print(f"| {name} | {times[len(times) // 2]:.1f} s | {peak / 1e9:.2f} GB | {ratio} | {all_runs} |")

if __name__ == "__main__":
    main()
