"""`vlhub dump-embeddings` on a full-size Qwen2-VL-7B-shaped checkpoint (table 152064 x 3584, bf16 -> fp16).

    flock /tmp/vlhub-bench.lock python benchmarks/bench_embeddings.py [--data DIR] [--repeat N]

Generates the checkpoint once (random weights, official shapes, bf16, five ~4 GB shards), then runs each
command in a fresh child process with a cold page cache, beside the plain script the issue compares with:
`safe_open` the one shard, `get_tensor`, cast to float16 with torch, `tofile`. Whole-process wall time
(interpreter and imports included: that is what a user waits for), median over rounds, and the largest
peak RSS of any round.
Checks that both wrote the same bytes, then prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from _harness import drop_page_cache, full_size_checkpoint, measure, python

from vlhub.formats.writers import file_sha256

EMBEDDING = "model.embed_tokens.weight"
PLAIN_SCRIPT = (
    "import sys, torch; from safetensors import safe_open\n"
    "with safe_open(sys.argv[1], 'pt') as f:\n"
    "    table = f.get_tensor(sys.argv[2])\n"
    "table.to(torch.float16).numpy().tofile(sys.argv[3])"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--repeat", type=int, default=5, help="cold runs per command; the median is shown")
    args = parser.parse_args()
    checkpoint = full_size_checkpoint("qwen2-vl-7b", args.data)
    shard = checkpoint / json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"][EMBEDDING]
    cold = drop_page_cache()
    out = Path(tempfile.mkdtemp(prefix="bench-embeddings-", dir=args.data))  # the checkpoint's disk
    try:
        (out / "vlhub").mkdir()
        (out / "heads").mkdir()
        jobs: list[tuple[str, list[str], int]] = [
            ("`vlhub dump-embeddings` (fp16)",
             ["vlhub", "dump-embeddings", str(checkpoint), "--out", str(out / "vlhub"), "--overwrite"], 1),
            ("baseline: `safe_open` + `get_tensor` + torch cast + `tofile`",
             python(PLAIN_SCRIPT) + [str(shard), EMBEDDING, str(out / "plain.bin")], 1),
            ("`vlhub dump-embeddings --lm-head` (fp16, two tables)",
             ["vlhub", "dump-embeddings", str(checkpoint), "--out", str(out / "heads"), "--lm-head", "--overwrite"], 2),
        ]
        # this machine's virtual disk is noisy: rounds interleave the commands so they share the noise
        rounds = [[measure(argv) for _, argv, _ in jobs] for _ in range(args.repeat)]
        sidecar = json.loads((out / "vlhub" / "embed_tokens.json").read_text())
        if file_sha256(out / "plain.bin") != sidecar["sha256"]:
            raise SystemExit("vlhub and the plain script wrote different bytes")
        table_bytes = sidecar["size"]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    rows, cols = sidecar["shape"]
    print(f"median of {args.repeat} runs; page cache dropped before each: {'yes' if cold else 'no (not root)'}; "
          "outputs identical: yes\n")
    print(f"| Qwen2-VL-7B-shaped table {rows} x {cols} -> {table_bytes / 1e9:.2f} GB fp16 | time | peak RSS | "
          "written |")
    print("|---|---|---|---|")
    for i, (what, _, tables) in enumerate(jobs):
        runs = [round_[i] for round_ in rounds]
        seconds = sorted(r.seconds for r in runs)[len(runs) // 2]
        peak = max(r.peak_rss_bytes for r in runs)
        written = tables * table_bytes
        print(f"| {what} | {seconds:.2f} s | {peak / 1e6:.0f} MB | {written / 1e9:.2f} GB, "
              f"{written / seconds / 1e9:.2f} GB/s |")


if __name__ == "__main__":
    main()
