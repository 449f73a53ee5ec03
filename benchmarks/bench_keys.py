"""`vlhub keys --out` on a full-size Qwen2-VL-2B-shaped checkpoint (4.4 GB), against `cp -r`.

    python benchmarks/bench_keys.py [--data DIR] [--rounds N] [--format pdparams|safetensors]

The checkpoint (random bf16 weights, official shapes, ~4 GB shards; pdparams by default, the format
Paddle users rename) is generated once. Each round runs `vlhub keys SRC --rename model.=llm. --out`
(with --allow-unknown-layout: `llm.` is no layout a loader reads, and the bytes copied are the same)
and `cp -r SRC` in fresh processes with a cold page cache, each followed by `sync` (the write is not
done until it is on disk), interleaved so both share the disk's noise. Reported: the median time, the
peak resident memory, and the median of the per-round ratios to cp (this machine's virtual disk swings
by 2x between runs; a round's two commands see the same disk, so their ratio is the steadier figure).
Targets: peak RSS <= 500 MB, time <= 1.2x cp.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _harness import against_cp, full_size_checkpoint

MODEL = "qwen2-vl-2b"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--format", choices=["pdparams", "safetensors"], default="pdparams")
    args = parser.parse_args()
    source = full_size_checkpoint(MODEL, args.data, format=args.format)
    size = sum(p.stat().st_size for p in source.iterdir())
    print(f"{MODEL}-shaped {args.format} ({size / 1e9:.2f} GB); {args.rounds} cold rounds, "
          "each command followed by sync\n")
    against_cp(source, lambda out: (f"vlhub keys '{source}' --rename model.=llm. --allow-unknown-layout "
                                    f"--out '{out}' 2>/dev/null"),
               "`vlhub keys --rename model.=llm. --out`", rounds=args.rounds, scratch=args.data)


if __name__ == "__main__":
    main()
