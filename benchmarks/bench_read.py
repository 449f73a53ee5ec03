"""`vlhub inspect` and single-tensor reads on a full-size Qwen2-VL-7B-shaped checkpoint (16.6 GB).

    python benchmarks/bench_read.py [--data DIR]

Generates the checkpoint once (random weights, official shapes, bf16, five ~4 GB shards), then
measures each operation in a fresh child process with a cold page cache, beside the baselines
users reach for today: `safe_open` for listing, `safetensors.torch.load_file` for one tensor, and
`dd` of exactly the same bytes for raw disk speed. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

from _harness import drop_page_cache, full_size_checkpoint, measure, python

SMALL, BIG = "model.norm.weight", "model.embed_tokens.weight"
# the child times only the work itself and prints it, so interpreter start-up is not counted
TIMED_READ = (
    "import sys, time; from vlhub.formats.readers import open_checkpoint\n"
    "t = time.perf_counter(); open_checkpoint(sys.argv[1]).read(sys.argv[2]); print(time.perf_counter() - t)"
)
TIMED_LOAD_FILE = (
    "import sys, time; from safetensors.torch import load_file\n"
    "t = time.perf_counter(); load_file(sys.argv[1])[sys.argv[2]].clone(); print(time.perf_counter() - t)"
)
LIST_HEADERS = (
    "import json, sys; from safetensors import safe_open; p = sys.argv[1]\n"
    "shards = set(json.load(open(p + '/model.safetensors.index.json'))['weight_map'].values())\n"
    "print(sum(len(list(safe_open(p + '/' + s, 'np').keys())) for s in shards))"
)


def byte_range(shard: Path, name: str) -> tuple[int, int]:
    """Absolute offset and length of one tensor's bytes in a safetensors shard."""
    with open(shard, "rb") as file:
        (header_len,) = struct.unpack("<Q", file.read(8))
        begin, end = json.loads(file.read(header_len))[name]["data_offsets"]
    return 8 + header_len + begin, end - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--repeat", type=int, default=5, help="cold runs per operation; the median is shown")
    args = parser.parse_args()
    checkpoint = full_size_checkpoint("qwen2-vl-7b", args.data)
    weight_map = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    cold = drop_page_cache()
    jobs: list[tuple[str, list[str], int | None, bool]] = [
        ("`vlhub inspect` (whole process)", ["vlhub", "inspect", str(checkpoint), "--json"], None, False),
        ("baseline: `safe_open` key listing (whole process)", python(LIST_HEADERS) + [str(checkpoint)], None, False),
    ]
    for name in (SMALL, BIG):
        shard = checkpoint / weight_map[name]
        offset, length = byte_range(shard, name)
        label = f"`{name}` ({length / 1e9:.2f} GB)" if length > 1e8 else f"`{name}` ({length / 1e3:.3g} KB)"
        jobs += [
            (f"vlhub: open checkpoint + read {label}", python(TIMED_READ) + [str(checkpoint), name], length, True),
            (f"baseline: `load_file(shard)[name].clone()`, {label}",
             python(TIMED_LOAD_FILE) + [str(shard), name], length, True),
            (f"baseline: `dd` of the same {label} bytes (whole process)",
             ["dd", f"if={shard}", "of=/dev/null", "bs=4M", f"skip={offset}", f"count={length}",
              "iflag=skip_bytes,count_bytes"], length, False),
        ]
    # this machine's virtual disk is noisy: rounds interleave the operations so they share the noise,
    # and the median of the cold runs is reported
    rounds = [[measure(argv) for _, argv, _, _ in jobs] for _ in range(args.repeat)]
    rows = []
    for i, (what, _, nbytes, timed_by_child) in enumerate(jobs):
        runs = [round_[i] for round_ in rounds]
        times = sorted(float(r.stdout.split()[-1]) if timed_by_child else r.seconds for r in runs)
        seconds = times[len(times) // 2]
        peak = max(r.peak_rss_bytes for r in runs)
        speed = f"{nbytes / seconds / 1e9:.2f} GB/s" if nbytes and nbytes > 1e8 else ""
        rows.append((what, f"{seconds:.3f} s", f"{peak / 1e6:.0f} MB", speed))
    print(f"median of {args.repeat} runs; page cache dropped before each: {'yes' if cold else 'no (not root)'}\n")
    print("| operation (Qwen2-VL-7B-shaped, 16.6 GB, 5 shards) | time | peak RSS | throughput |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
