"""`vlhub convert --to paddle` of a full-size checkpoint (Qwen2-VL-7B-shaped by default, 16.6 GB) against `cp -r`.

    python benchmarks/bench_convert.py [--data DIR] [--rounds N] [--model NAME] [--layers N]

The checkpoint (random bf16 weights, official shapes and ~4 GB shards) is generated once. `--layers N` keeps
the model's first N decoder layers and everything else at full width: `--model qwen2-vl-72b --layers 2` has the
72B's [152064, 8192] embedding and lm_head (2.49 GB each), the largest tensors vlhub converts, in 9.7 GB. Each
round runs `vlhub convert SRC --to paddle` and `cp -r SRC` of the same bytes in fresh processes with a cold page
cache, each followed by `sync` (the write is not done until it is on disk); the medians are reported with every
run and the peak resident memory of each command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _harness import OFFICIAL_SHARD_SIZE, against_cp, full_size_checkpoint

from vlhub.catalog import get_model
from vlhub.hub.synthetic import write_synthetic_checkpoint


def checkpoint_with_layers(model: str, layers: int, root: Path) -> Path:
    """The model's shapes with only its first `layers` decoder layers (made once)."""
    spec = get_model(model)
    out = root / f"{model}-{layers}-layers"
    if not (out / "config.json").is_file():
        print(f"generating {model} with {layers} decoder layers in {out} ...", file=sys.stderr)
        write_synthetic_checkpoint(out, spec.family, {**spec.config, "num_hidden_layers": layers},
                                   max_shard_size=OFFICIAL_SHARD_SIZE)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="qwen2-vl-7b")
    parser.add_argument("--layers", type=int, help="keep only this many decoder layers (default: all)")
    args = parser.parse_args()
    if args.layers is None:
        source = full_size_checkpoint(args.model, args.data)
    else:
        source = checkpoint_with_layers(args.model, args.layers, args.data)
    size = sum(path.stat().st_size for path in source.iterdir())
    layers = f", {args.layers} decoder layers" if args.layers is not None else ""
    print(f"{args.model}-shaped safetensors ({size / 1e9:.1f} GB{layers}) -> pdparams; {args.rounds} cold rounds, "
          "each command followed by sync\n")
    against_cp(source, lambda out: f"vlhub convert '{source}' --to paddle --out '{out}' --no-smoke 2>/dev/null",
               "`vlhub convert --to paddle`", rounds=args.rounds, scratch=args.data)


if __name__ == "__main__":
    main()
