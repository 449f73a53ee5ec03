"""`vlhub inspect` and single-tensor reads on a full-size Qwen2-VL-7B-shaped checkpoint (16.6 GB).

    python benchmarks/bench_read.py [--data DIR]

Generates the checkpoint once (random weights, official shapes, bf16, five ~4 GB shards), then
measures each operation in a fresh child process with a cold page cache, beside the baselines
users reach for today: `safe_open` for listing, `safetensors.torch.load_file` for one tensor,
and `cp` for raw disk speed. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _harness import drop_page_cache, full_size_checkpoint, measure, python

SMALL, BIG = "model.norm.weight", "model.embed_tokens.weight"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path(__file__).parent / "data")
    args = parser.parse_args()
    checkpoint = full_size_checkpoint("qwen2-vl-7b", args.data)
    weight_map = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    big_shard = checkpoint / weight_map[BIG]
    cold = drop_page_cache()
    rows = []

    def row(what: str, argv: list[str], nbytes: int | None = None) -> None:
        run = measure(argv)
        speed = f"{nbytes / run.seconds / 1e9:.2f} GB/s" if nbytes else ""
        rows.append((what, f"{run.seconds:.2f} s", f"{run.peak_rss_bytes / 1e6:.0f} MB", speed))

    row("vlhub inspect (16.6 GB, 5 shards)", ["vlhub", "inspect", str(checkpoint), "--json"])
    row("baseline: safe_open header listing", python(
        "import json,sys; from safetensors import safe_open; p=sys.argv[1]\n"
        "n=0\nfor s in set(json.load(open(p+'/model.safetensors.index.json'))['weight_map'].values()):\n"
        "    f=safe_open(p+'/'+s,'np')\n    n+=sum(1 for _ in f.keys())\nprint(n)") + [str(checkpoint)])
    read = "import sys; from vlhub.converters.readers import open_checkpoint; open_checkpoint(sys.argv[1]).read(sys.argv[2])"
    row(f"vlhub read {SMALL} (7 KB)", python(read) + [str(checkpoint), SMALL])
    row("baseline: safetensors.torch.load_file(shard)[name]", python(
        "import sys; from safetensors.torch import load_file; load_file(sys.argv[1])[sys.argv[2]]")
        + [str(checkpoint / weight_map[SMALL]), SMALL])
    embed_bytes = 152064 * 3584 * 2
    row(f"vlhub read {BIG} (1.09 GB)", python(read) + [str(checkpoint), BIG], embed_bytes)
    with tempfile.TemporaryDirectory(dir=args.data) as scratch:
        row(f"baseline: cp {big_shard.name} ({big_shard.stat().st_size / 1e9:.2f} GB)",
            ["cp", str(big_shard), scratch], big_shard.stat().st_size)
    print(f"page cache dropped before each run: {'yes' if cold else 'no (not root)'}\n", file=sys.stderr)
    print("| operation | time | peak RSS | throughput |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
