"""Run one greedy token of an llm_convert vision-language bmodel (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) on TPU-MLIR's
cmodel simulator, feeding its networks as LLM-TPU's runtime does (models/Qwen2_VL, Qwen2_5_VL, Qwen3_VL
python_demo/chat.cpp, without history).

Standalone: the toolchain's Python 3.10 runs this file by path, with numpy and tpu_mlir only (never vlhub).
vlhub.targets.tpu_mlir.simulator writes the inputs, already shaped as the networks take them:

    python3.10 cmodel_runner.py BMODEL INPUTS.npz RESULT.npz [--chip bm1684x]

INPUTS.npz: `vit.<input>` for every input of the `vit` network (float32 / int32: padded to its rows for a static
ViT, the image's own rows for a dynamic one), `input_ids` [1, S], `position_ids` [3, S] (static blocks) or [3, L]
(dynamic blocks, which take the prompt's L rows and mask it themselves), `attention_mask` [1, 1, S, S] (additive,
float32; static blocks only), `image_rows` (the sequence positions the ViT's first rows fill, in order) and `last`
(the prompt's last position). It runs vit, embedding (image rows replaced), block_0 .. block_{N-1} and lm_head
on that position. A ViT with more than one output (Qwen3-VL's DeepStack) has its k-th extra output added to
block_{k}'s output at the image rows, through the bmodel's `add` network, as the runtime does.
RESULT.npz: `token` (lm_head's greedy choice), `hidden` [H] float32 (the last block's output there: llm_convert
fuses the final norm into the last block, so lm_head.weight @ hidden are the logits), `image_embeds` [n, H]
float32 ([1 + k, n, H] with DeepStack features) and `seconds` (JSON: seconds per network). Progress lines go to
stdout prefixed with PREFIX.
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
        os.makedirs(links, exist_ok=True)  # a RESULT beside an earlier run's reuses it
        link = os.path.join(links, "libcmodel.so")
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.join(root, "lib", CMODEL_LIBRARIES[chip]), link)
        os.environ["LD_LIBRARY_PATH"] = links + os.pathsep + os.environ.get("LD_LIBRARY_PATH", "")
        os.environ[_REEXEC] = "1"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    sys.path.insert(0, os.path.join(root, "python"))
    import pyruntime_bm

    return pyruntime_bm


class Output:
    """A network's output after a run: its values (as the runtime holds them; bf16 as uint16 bits), cut to the
    shape this run gave, and the runtime's name of its dtype."""

    def __init__(self, tensor: Any, shape: list[int] | None = None) -> None:
        data = np.array(tensor.data)
        self.dtype: str = tensor.dtype
        self.data = data if shape is None else data.reshape(-1)[:int(np.prod(shape))].reshape(shape)


class Runner:
    """The bmodel's networks by name, each run with named inputs; seconds spent per network."""

    def __init__(self, runtime: Any, bmodel: str) -> None:
        self.model = runtime.Model(bmodel, 0, "")
        self.nets = {name: self.model.Net(name) for name in self.model.networks}
        self.seconds: dict[str, float] = {}

    def run(self, name: str, **inputs: np.ndarray) -> dict[str, Output]:
        """Fill the inputs, forward, return the outputs by name, in the network's order. An input smaller than
        the network's (a dynamic network's real rows) runs it at the shapes given."""
        net = self.nets[name]
        started = time.monotonic()
        shapes, dynamic = [], False
        for tensor in net.inputs:
            if tensor.name not in inputs:
                sys.exit(f"{name}: no value for its input {tensor.name}")
            value = as_tensor(np.asarray(inputs[tensor.name]), tensor)
            if value.size > tensor.data.size or (value.size < tensor.data.size and value.ndim != tensor.data.ndim):
                sys.exit(f"{name}: input {tensor.name} is {list(tensor.data.shape)}, given {list(value.shape)}")
            dynamic = dynamic or value.size < tensor.data.size
            shapes.append(list(value.shape))
            tensor.data.reshape(-1)[:value.size] = value.reshape(-1)
        if dynamic:
            outputs = [Output(tensor, shape) for tensor, shape in zip(net.outputs, net.forward_dynamic(shapes))]
        else:
            net.forward()
            outputs = [Output(tensor) for tensor in net.outputs]
        self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - started
        return {tensor.name: output for tensor, output in zip(net.outputs, outputs)}


def first_token(runner: Runner, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """vit, embedding with the image rows replaced, every prefill block (each of the first k followed by `add`
    of the ViT's k-th DeepStack feature), lm_head on the last prompt position."""
    image_rows = inputs["image_rows"]
    vit = {key[len("vit."):]: value for key, value in inputs.items() if key.startswith("vit.")}
    say(f"vit: {len(image_rows)} image tokens")
    outputs = list(runner.run("vit", **vit).values())
    features, image_dtype = [output.data[:len(image_rows)] for output in outputs], outputs[0].dtype
    say("embedding")
    embedded = runner.run("embedding", input_ids=inputs["input_ids"])["embedding"]
    if embedded.dtype != image_dtype:
        sys.exit(f"vit returns {image_dtype}, embedding {embedded.dtype}: not an llm_convert bmodel")
    padded, dtype = embedded.data.copy(), embedded.dtype  # [1, S, H]: the embedding network is static
    padded[0, image_rows] = features[0]
    deepstack = []
    for feature in features[1:]:  # the runtime's deepstack buffers: the feature at the image rows, zero elsewhere
        buffer = np.zeros_like(padded)
        buffer[0, image_rows] = feature
        deepstack.append(buffer)
    if deepstack and "add" not in runner.nets:
        sys.exit(f"vit returns {len(deepstack)} DeepStack features but the bmodel has no `add` network")
    position_ids = inputs["position_ids"]
    length = position_ids.shape[-1]  # S for static blocks, the prompt's L for dynamic ones
    block = {"position_ids": position_ids}
    if "attention_mask" in inputs:
        block["attention_mask"] = inputs["attention_mask"]
    hidden = padded[:, :length]
    layers = sum(1 for name in runner.nets if name.startswith("block_") and name[len("block_"):].isdigit())
    for layer in range(layers):
        say(f"block_{layer} of {layers}")
        out = runner.run(f"block_{layer}", input_states=hidden, **block)["output_states"]
        hidden, dtype = out.data, out.dtype
        if layer < len(deepstack):
            say(f"add: DeepStack feature {layer}")
            full = np.zeros_like(padded)
            full[:, :hidden.shape[1]] = hidden
            added = next(iter(runner.run("add", input0=full.reshape(-1), input1=deepstack[layer].reshape(-1))
                              .values()))
            hidden, dtype = added.data.reshape(padded.shape)[:, :length], added.dtype
    last = int(inputs["last"])
    say("lm_head (the vocabulary's matmul: minutes on the simulator)")
    head = next(iter(runner.run("lm_head", hidden_states=hidden[:, last]).values()))
    values = head.data.reshape(-1)
    # lm_head ends in a fused top-1, unless compiled with --do_sample: then it returns the logits
    token = int(values[0]) if values.size == 1 else int(to_float32(values, head.dtype).argmax())
    image = np.stack([to_float32(feature, image_dtype) for feature in features])
    return {"token": np.int64(token), "hidden": to_float32(hidden[:, last], dtype).reshape(-1),
            "image_embeds": image[0] if len(features) == 1 else image}


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
