"""Qwen3-VL-30B-A3B-shaped checkpoints with a few decoder layers (full-size experts: 128 of them, each layer's two
fused expert tensors 805 MB and 403 MB in bf16): `vlhub convert --to safetensors` and `--to paddle`, then each
output's smoke test on its own (`vlhub smoke OUT`), against `cp -r` of the same bytes; peak memory at two depths,
to show it does not grow with layers (nor holds a layer's expert tensors in float32).

    python benchmarks/bench_moe.py [--data DIR] [--layers 2 4] [--rounds N]

The checkpoints (random bf16 weights in the official shapes, transformers 5's re-save form of the experts
[E, 2 x moe_inter, hidden], so the conversion transposes every expert into the Hub's form) are generated once.
Each run is a fresh process with a cold page cache, followed by `sync`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from _harness import OFFICIAL_SHARD_SIZE, Run, measure

from vlhub.catalog import get_model
from vlhub.hub.synthetic import write_synthetic_checkpoint

MODEL = "qwen3-vl-30b-a3b"


def shaped_checkpoint(layers: int, root: Path) -> Path:
    """The 30B-A3B config with `layers` decoder layers; experts stored as transformers 5 re-saves them."""
    spec = get_model(MODEL)
    config = {**spec.config, "text_config": {**spec.config["text_config"], "num_hidden_layers": layers}}
    out = root / f"{MODEL}-{layers}-layers"
    if not (out / "config.json").is_file():
        print(f"generating {out} ...", file=sys.stderr)
        write_synthetic_checkpoint(out, spec.family, config, max_shard_size=OFFICIAL_SHARD_SIZE,
                                   layout=spec.family.keymap.layout("transformers-5"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    args.data.mkdir(parents=True, exist_ok=True)
    print("| command | layers | source GB | median time | peak RSS | runs (s) |")
    print("|---|---|---|---|---|---|")
    for layers in args.layers:
        source = shaped_checkpoint(layers, args.data)
        size = sum(p.stat().st_size for p in source.iterdir()) / 1e9
        for label, argv in (
            ("`cp -r` (baseline)", lambda out: f"cp -r '{source}' '{out}'"),
            ("`vlhub convert --to safetensors --no-smoke`", lambda out: (
                f"vlhub convert '{source}' --to safetensors --out '{out}' --no-smoke 2>/dev/null")),
            ("`vlhub convert --to paddle --no-smoke`", lambda out: (
                f"vlhub convert '{source}' --to paddle --out '{out}' --no-smoke 2>/dev/null")),
        ):
            runs: list[Run] = []
            smokes: list[Run] = []
            for _ in range(args.rounds):
                with tempfile.TemporaryDirectory(dir=args.data) as directory:
                    out = Path(directory) / "out"
                    runs.append(measure(["sh", "-c", f"{argv(out)} && sync"]))
                    if "vlhub" in label:  # its smoke test on its own: the reference against the output's runtime
                        smokes.append(measure(["sh", "-c", f"vlhub smoke '{out}' 2>/dev/null"]))
            _row(label, layers, size, runs)
            if smokes:
                _row(f"`vlhub smoke` of that output ({'Paddle' if 'paddle' in label else 'numpy reference'})",
                     layers, size, smokes)


def _row(label: str, layers: int, size: float, runs: list[Run]) -> None:
    seconds = statistics.median(r.seconds for r in runs)
    peak = max(r.peak_rss_bytes for r in runs)
    print(f"| {label} | {layers} | {size:.1f} | {seconds:.1f} s | {peak / 1e6:,.0f} MB | "
          f"{', '.join(f'{r.seconds:.1f}' for r in runs)} |", flush=True)

if __name__ == "__main__":
    main()
