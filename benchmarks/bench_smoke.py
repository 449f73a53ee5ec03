"""`vlhub smoke` of a full-size Qwen2-VL-7B-shaped Paddle conversion against its 16.6 GB source, streamed.

    python benchmarks/bench_smoke.py [--data DIR] [--rounds N] [--tokens N]

Both checkpoints are generated once (random bf16 weights in the official shapes; the Paddle copy by
`vlhub convert --no-smoke`). Each round starts with a cold page cache and runs, in fresh processes,
`vlhub smoke PADDLE --against SRC --streamed` (the numpy reference on the source, greedy decoding,
then the Paddle forward on the conversion, one layer's weights at a time on each side) and, as the
floor any smoke test must pay, `cat` of both checkpoints' weight files to /dev/null; the table gives
the median of the per-round ratios (the two share each round's disk and load).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from _harness import full_size_checkpoint, measure


def paddle_copy(source: Path) -> Path:
    out = source.with_name(source.name + "-paddle")
    if not (out / "config.json").is_file():
        print(f"converting {source} to {out} ...", file=sys.stderr)
        subprocess.run(["vlhub", "convert", str(source), "--to", "paddle", "--out", str(out), "--no-smoke"],
                       check=True, stdout=subprocess.DEVNULL)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=4)
    args = parser.parse_args()
    source = full_size_checkpoint("qwen2-vl-7b", args.data)
    converted = paddle_copy(source)
    weights = sorted(str(p) for d in (source, converted) for p in d.iterdir() if p.suffix in (".safetensors", ".pdparams"))
    smoke = ["vlhub", "smoke", str(converted), "--against", str(source), "--streamed", "--tokens", str(args.tokens),
             "--json"]
    runs: dict[str, list] = {"smoke": [], "cat": []}
    for _ in range(args.rounds):
        runs["smoke"].append(measure(smoke))
        runs["cat"].append(measure(["sh", "-c", f"cat {' '.join(weights)} > /dev/null"]))
    verdicts = [json.loads(run.stdout) for run in runs["smoke"]]
    print(f"Qwen2-VL-7B-shaped: {source} (safetensors, 16.6 GB) vs {converted} (pdparams); {args.rounds} cold "
          f"rounds; {args.tokens} greedy tokens\n")
    print("| command | median time | median of per-round ratios to `cat` | peak RSS | all runs (s) | verdict |")
    print("|---|---|---|---|---|---|")
    for label, name in (("`vlhub smoke --streamed` (reference + Paddle)", "smoke"),
                        ("`cat` of both checkpoints (read floor)", "cat")):
        seconds = [r.seconds for r in runs[name]]
        ratio = statistics.median(r.seconds / floor.seconds for r, floor in zip(runs[name], runs["cat"]))
        peak = max(r.peak_rss_bytes for r in runs[name])
        verdict = ""
        if name == "smoke":
            verdict = ", ".join(f"{'passed' if v['passed'] else 'FAILED'} (rel. diff {v['stages'][1]['relative']:.1e})"
                                for v in verdicts[:1])
        print(f"| {label} | {statistics.median(seconds):.1f} s | {ratio:.2f}x | {peak / 1e9:.2f} GB | "
              f"{', '.join(f'{s:.1f}' for s in seconds)} | {verdict} |")


if __name__ == "__main__":
    main()
