"""Peak memory of `vlhub convert --to tpu-mlir --onnx` at Qwen2-VL-7B width: one layer at a time.

    flock /tmp/vlhub-bench.lock python benchmarks/bench_tpu_onnx.py [--layers 4] [--data DIR]

The checkpoint has Qwen2-VL-7B's shapes (hidden 3584, 28 heads, 4 KV heads, vocabulary 152064, the 32-block
ViT) with random bf16 weights, but only `--layers` decoder layers: the full 28 would need about 50 GB of free
disk for model/ (16.6 GB) and the float32 networks (33 GB), more than this machine has. Memory does not grow
with the number of layers, which is what the figure shows: the peak is about three copies of one float32
layer (0.93 GB at this width) while its network is saved, or the tables streamed in 64 MB blocks.
`cp -r` of the same checkpoint is the disk reference. Each run's peak RSS is the child's (`/usr/bin/time`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from _harness import measure

from vlhub.catalog import get_model
from vlhub.family_registry import FAMILIES
from vlhub.hub.synthetic import write_synthetic_checkpoint


def checkpoint(data: Path, layers: int) -> Path:
    """Qwen2-VL-7B's shapes with `layers` decoder layers, generated once."""
    out = data / f"qwen2-vl-7b-{layers}layers"
    if not (out / "config.json").is_file():
        config = json.loads(json.dumps(get_model("qwen2-vl-7b").config))
        config["num_hidden_layers"] = layers
        print(f"generating {out} ...", file=sys.stderr)
        write_synthetic_checkpoint(out, FAMILIES["qwen2_vl"], config, max_shard_size=4 * 10**9)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    source = checkpoint(args.data, args.layers)
    size = sum(p.stat().st_size for p in source.iterdir())
    rows = []
    with tempfile.TemporaryDirectory(dir=args.data, prefix=".bench-tpu-") as scratch:
        out = Path(scratch) / "layout"
        run = measure(["vlhub", "convert", str(source), "--to", "tpu-mlir", "--onnx", "--no-smoke", "--quantize",
                       "bf16", "--out", str(out)])
        written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        networks = len(list(out.glob("models/onnx/*/*.onnx")))
        rows.append(("`vlhub convert --to tpu-mlir --onnx`", run, written, f"{networks} networks"))
        shutil.rmtree(out)
        copy = measure(["cp", "-r", str(source), str(Path(scratch) / "copy")])
        rows.append(("`cp -r` of the checkpoint", copy, size, "disk reference"))
    print(f"\nQwen2-VL-7B shapes with {args.layers} of 28 decoder layers ({size / 1e9:.1f} GB bf16)\n")
    print("| command | seconds | peak RSS | written | |")
    print("|---|---|---|---|---|")
    for label, result, nbytes, note in rows:
        print(f"| {label} | {result.seconds:.1f} | {result.peak_rss_bytes / 1e9:.2f} GB | {nbytes / 1e9:.1f} GB "
              f"| {note} |")


if __name__ == "__main__":
    main()
