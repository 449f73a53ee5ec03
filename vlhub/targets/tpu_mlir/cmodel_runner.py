"""Run one greedy token of an llm_convert Qwen2(.5)-VL bmodel on TPU-MLIR's cmodel simulator.

Standalone: the toolchain's Python 3.10 runs this file by path, with numpy and tpu_mlir only (never vlhub).
vlhub.targets.tpu_mlir.simulator writes the inputs, already shaped as the networks take them:

    python3.10 cmodel_runner.py BMODEL INPUTS.npz RESULT.npz [--chip bm1684x]

INPUTS.npz: `vit.<input>` for every input of the `vit` network (float32 / int32, padded to its rows),
`input_ids` [1, S], `position_ids` [3, S], `attention_mask` [1, 1, S, S] (additive, float32),
`image_rows` (the sequence positions the ViT's first rows fill, in order) and `last` (the prompt's last
position). It runs vit, embedding (image rows replaced), block_0 .. block_{N-1} and lm_head on that position.
RESULT.npz: `token` (lm_head's greedy choice), `hidden` [H] float32 (the last block's output there: llm_convert
fuses the final norm into the last block, so lm_head.weight @ hidden are the logits), `image_embeds` [n, H]
float32 and `seconds` (JSON: seconds per network). Progress lines go to stdout prefixed with PREFIX.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

PREFIX = "[cmodel] "
# the simulator library each chip's bmodel runs on (tpu_mlir/lib/libcmodel_<chip>.so, loaded as libcmodel.so)
CMODEL_LIBRARIES = {"bm1684x": "libcmodel_bm1684x.so", "bm1688": "libcmodel_bm1688.so"}
_REEXEC = "_VLHUB_CMODEL_RUNNER"


def to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 to bfloat16 bit patterns (uint16), rounding to nearest even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def as_tensor(values: np.ndarray, tensor: Any) -> np.ndarray:
    """`values` in the dtype a runtime tensor holds (bf16 as uint16 bits); already-converted arrays pass."""
    target = tensor.data.dtype
    if values.dtype == target:
        return values
    if tensor.dtype == "bf16":
        return to_bf16(values)
    return values.astype(target)


def to_float32(data: np.ndarray, dtype: str) -> np.ndarray:
    """A runtime tensor's data (dtype as the runtime names it) as float32."""
    return from_bf16(data) if dtype == "bf16" else data.astype(np.float32)


def say(message: str) -> None:
    print(PREFIX + message, flush=True)


def start_runtime(chip: str, workdir: str) -> Any:
    """Import pyruntime_bm with LD_LIBRARY_PATH in effect for the dynamic loader, which reads it only at process
    start: `import tpu_mlir` sets it in os.environ, then this process re-executes itself once. `workdir` receives
    the chip's libcmodel.so link."""
    import tpu_mlir

    root = os.path.dirname(tpu_mlir.__file__)
    if os.environ.get(_REEXEC) != "1":
        # libbmlib opens libcmodel.so by name: a private directory holding that name for this chip, searched
        # first, leaves the wheel's shared lib/libcmodel.so alone
        links = os.path.join(workdir, "cmodel-lib")
        os.makedirs(links)
        os.symlink(os.path.join(root, "lib", CMODEL_LIBRARIES[chip]), os.path.join(links, "libcmodel.so"))
        os.environ["LD_LIBRARY_PATH"] = links + os.pathsep + os.environ.get("LD_LIBRARY_PATH", "")
        os.environ[_REEXEC] = "1"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    sys.path.insert(0, os.path.join(root, "python"))
    import pyruntime_bm

    return pyruntime_bm


class Runner:
    """The bmodel's networks by name, each run with named inputs; seconds spent per network."""

    def __init__(self, runtime: Any, bmodel: str) -> None:
        self.model = runtime.Model(bmodel, 0, "")
        self.nets = {name: self.model.Net(name) for name in self.model.networks}
        self.seconds: dict[str, float] = {}

    def run(self, name: str, **inputs: np.ndarray) -> dict[str, Any]:
        """Fill the inputs, forward, return the output tensors by name (read them before the next run)."""
        net = self.nets[name]
        started = time.monotonic()
        for tensor in net.inputs:
            if tensor.name not in inputs:
                sys.exit(f"{name}: no value for its input {tensor.name}")
            value = as_tensor(np.asarray(inputs[tensor.name]), tensor)
            if value.size != tensor.data.size:
                sys.exit(f"{name}: input {tensor.name} is {list(tensor.data.shape)}, given {list(value.shape)}")
            tensor.data.reshape(-1)[:] = value.reshape(-1)
        net.forward()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - started
        return {tensor.name: tensor for tensor in net.outputs}


def first_token(runner: Runner, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """vit, embedding with the image rows replaced, every prefill block, lm_head on the last prompt position."""
    image_rows = inputs["image_rows"]
    vit = {key[len("vit."):]: value for key, value in inputs.items() if key.startswith("vit.")}
    say(f"vit: {len(image_rows)} image tokens")
    image = next(iter(runner.run("vit", **vit).values()))
    image_dtype, image = image.dtype, np.array(image.data)[:len(image_rows)]
    say("embedding")
    embedded = runner.run("embedding", input_ids=inputs["input_ids"])["embedding"]
    if embedded.dtype != image_dtype:
        sys.exit(f"vit returns {image_dtype}, embedding {embedded.dtype}: not an llm_convert bmodel")
    hidden, dtype = np.array(embedded.data), embedded.dtype
    hidden[0, image_rows] = image
    layers = sum(1 for name in runner.nets if name.startswith("block_") and name[len("block_"):].isdigit())
    for layer in range(layers):
        say(f"block_{layer} of {layers}")
        out = runner.run(f"block_{layer}", input_states=hidden, position_ids=inputs["position_ids"],
                         attention_mask=inputs["attention_mask"])["output_states"]
        hidden, dtype = np.array(out.data), out.dtype
    last = int(inputs["last"])
    say("lm_head (the vocabulary's matmul: minutes on the simulator)")
    head = next(iter(runner.run("lm_head", hidden_states=hidden[:, last]).values()))
    values = np.array(head.data).reshape(-1)
    # lm_head ends in a fused top-1, unless compiled with --do_sample: then it returns the logits
    token = int(values[0]) if values.size == 1 else int(to_float32(values, head.dtype).argmax())
    return {"token": np.int64(token), "hidden": to_float32(hidden[:, last], dtype).reshape(-1),
            "image_embeds": to_float32(image, image_dtype)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bmodel")
    parser.add_argument("inputs", help="npz written by vlhub.targets.tpu_mlir.simulator")
    parser.add_argument("result", help="npz to write")
    parser.add_argument("--chip", default="bm1684x", choices=sorted(CMODEL_LIBRARIES))
    args = parser.parse_args()
    runtime = start_runtime(args.chip, os.path.dirname(os.path.abspath(args.result)))
    started = time.monotonic()
    runner = Runner(runtime, args.bmodel)
    loaded = time.monotonic() - started
    say(f"loaded {len(runner.nets)} networks in {loaded:.1f} s")
    with np.load(args.inputs) as stored:
        inputs = dict(stored)
    result = first_token(runner, inputs)
    seconds = {"load": round(loaded, 1), **{name: round(value, 1) for name, value in runner.seconds.items()}}
    np.savez(args.result, **result, seconds=np.array(json.dumps(seconds)))
    say(f"token {int(result['token'])} ({json.dumps(seconds)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
