"""`vlhub convert` of a full-size Qwen2-VL-7B-shaped checkpoint (16.6 GB) to Paddle, against `cp -r`.

    python benchmarks/bench_convert.py [--data DIR] [--rounds N]

The checkpoint (random bf16 weights, official shapes and five ~4 GB shards) is generated once. Each
round runs `vlhub convert SRC --to paddle` and `cp -r SRC` of the same bytes in fresh processes with a
cold page cache, each followed by `sync` (the write is not done until it is on disk); the medians
are reported with every run and the peak resident memory of each command.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _harness import against_cp, full_size_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    source = full_size_checkpoint("qwen2-vl-7b", args.data)
    print(f"Qwen2-VL-7B-shaped safetensors (16.6 GB) -> pdparams; {args.rounds} cold rounds, each command "
          "followed by sync\n")
    against_cp(source, lambda out: f"vlhub convert '{source}' --to paddle --out '{out}' --no-smoke 2>/dev/null",
               "`vlhub convert --to paddle`", rounds=args.rounds, scratch=args.data)


if __name__ == "__main__":
    main()
