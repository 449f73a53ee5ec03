"""`vlhub convert --to paddle-inference` of a full-size checkpoint: time and peak memory, with and without
the smoke test, and the smoke test alone, against `cp -r` of the source.

    python benchmarks/bench_paddle_inference.py [--model qwen2-vl-2b] [--layers N] [--data DIR] [--rounds N]

The checkpoint (random bf16 weights in the official shapes and sharding) is generated once; with `--layers N`, the
model's shapes with only N decoder layers (full-width embedding and lm_head, the whole vision tower), which is how
a 72B layout is measured on a machine that cannot hold one: the smoke test holds one graph at a time, so its peak
does not depend on the number of layers. Each round starts with a cold page cache and runs, in fresh processes:
the conversion with its smoke test (weights, static graphs, then paddle.inference against the numpy reference),
`vlhub smoke` of that layout alone, the conversion with `--no-smoke`, and `cp -r` of the source. Outputs are
deleted after each run; the layout needs about twice the model's size on disk.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from _harness import full_size_checkpoint, measure

from vlhub.catalog import get_model
from vlhub.hub.synthetic import write_synthetic_checkpoint


def few_layers(model: str, layers: int, data: Path) -> Path:
    """`model`'s shapes with `layers` decoder layers (generated once, in the official shard size)."""
    spec = get_model(model)
    out = data / f"{model}-{layers}layers"
    if not (out / "config.json").is_file():
        config = json.loads(json.dumps(spec.config))
        text = config.get("text_config", config)  # a nested text config (Qwen3-VL) holds the layer count
        text["num_hidden_layers"] = layers
        print(f"generating {out} ...", file=sys.stderr)
        write_synthetic_checkpoint(out, spec.family, config, max_shard_size=4 * 10**9)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2-vl-2b")
    parser.add_argument("--layers", type=int, help="only this many decoder layers (the model's widths)")
    parser.add_argument("--data", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    source = few_layers(args.model, args.layers, args.data) if args.layers else full_size_checkpoint(args.model,
                                                                                                     args.data)
    size = sum(path.stat().st_size for path in source.iterdir() if path.is_file())
    out = args.data / f"{source.name}-paddle-inference"
    convert = ["vlhub", "convert", str(source), "--to", "paddle-inference", "--out", str(out)]
    commands = {  # label, command, whether the layout stays for the next command
        "`vlhub convert --to paddle-inference` (with its smoke test)": (convert + ["--json"], True),
        "`vlhub smoke` of that layout (the smoke test alone)": (["vlhub", "smoke", str(out), "--json"], False),
        "`vlhub convert --to paddle-inference --no-smoke`": (convert + ["--no-smoke"], False),
        "`cp -r` of the source (baseline)": (["cp", "-r", str(source), str(out)], False),
    }
    runs: dict[str, list] = {label: [] for label in commands}
    for _ in range(args.rounds):
        for label, (argv, keep) in commands.items():
            runs[label].append(measure(["sh", "-c", " ".join(f"'{a}'" for a in argv) + " && sync"]))
            if not keep:
                shutil.rmtree(out, ignore_errors=True)
    layers = f", {args.layers} decoder layers" if args.layers else ""
    print(f"{args.model}-shaped{layers} ({source}, {size / 1e9:.1f} GB); {args.rounds} cold round(s)\n")
    print("| command | median time | peak RSS | all runs (s) | smoke |")
    print("|---|---|---|---|---|")
    for label, measured in runs.items():
        verdict = ""
        if "--json" in commands[label][0]:
            report = json.loads(measured[0].stdout)
            smoke = report.get("smoke", report)
            relative = next(stage["relative"] for stage in smoke["stages"] if stage["name"] == "prefill logits")
            verdict = f"{'passed' if smoke['passed'] else 'FAILED'} (prefill rel. diff {relative:.1e})"
        print(f"| {label} | {statistics.median(r.seconds for r in measured):.1f} s | "
              f"{max(r.peak_rss_bytes for r in measured) / 1e9:.2f} GB | "
              f"{', '.join(f'{r.seconds:.1f}' for r in measured)} | {verdict} |")


if __name__ == "__main__":
    main()
