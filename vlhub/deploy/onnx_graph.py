"""ONNX networks built node by node with onnx.helper from `ModelWeights` (official names, float32), saved one at a
time with their weights streamed in: what the tpu-mlir and vamc targets build their networks from, and the vision
transformer both export (each with its own inputs and outputs around it).

A graph whose weights exceed EXTERNAL_DATA_BYTES (protobuf caps a file at 2 GB) keeps them in ONNX external data,
one file per group of networks sharing weights. Memory: a network with its weights inside holds them about three
times over while it is saved (the decoded tensor being added, the proto, its serialisation); external weights are
written a tensor at a time, tables in 64 MB row blocks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from vlhub import __version__
from vlhub.sizes import config_family
from vlhub.smoke.inputs import DEVICE_MASKED
from vlhub.smoke.weights import ModelWeights

OPSET = 15  # what the sophon-demo / LLM-TPU exporters used
IR_VERSION = 8  # opset 15's; TPU-MLIR's onnxruntime 1.16 refuses IR versions above 9
MASK_VALUE = float(DEVICE_MASKED)
EXTERNAL_DATA_BYTES = 1_500_000_000
_ALIGN = 4096  # external tensors start on page boundaries, so runtimes can map them
_BLOCK_BYTES = 64 << 20  # an embedding or lm_head is streamed to external data this much at a time
F32 = TensorProto.FLOAT
I32 = TensorProto.INT32
I64 = TensorProto.INT64

Progress = Callable[[int], None]


# ---------------------------------------------------------------------------------------------------
# Writing


class Store:
    """Where a group of networks' weights go: into each network's file (read from the checkpoint again for
    each, rather than kept: a network then holds its weights twice at most, in its proto and serialised), or,
    for a group over EXTERNAL_DATA_BYTES, once into the group's external data file that each network refers
    to (written a tensor at a time, 2-D tables in row blocks)."""

    def __init__(self, weights: ModelWeights, shapes: dict[str, tuple[int, ...]], data: BinaryIO | None,
                 on_bytes: Progress) -> None:
        self.weights, self.shapes, self.on_bytes = weights, shapes, on_bytes
        self.location = Path(data.name).name if data else None
        self._file = data
        self._placed: dict[tuple[str, bool], tuple[int, int]] = {}

    def has(self, name: str) -> bool:
        return self.weights.has(name)

    def add(self, graph: onnx.GraphProto, name: str, transpose: bool) -> None:
        """Official tensor `name` as an initializer of `graph`, transposed to [in, out] (the rest of its dims
        flattened into `in`) when asked."""
        shape = self.shapes[name]
        tensor = graph.initializer.add()  # filled in place: appending a built tensor would copy its data again
        tensor.name, tensor.data_type = name, F32
        tensor.dims.extend((math.prod(shape[1:]), shape[0]) if transpose else shape)
        if self._file is None:
            tensor.raw_data = self._array(name, transpose).astype("<f4", copy=False).tobytes()
            return
        offset, length = self._place(name, transpose)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", offset), ("length", length)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)

    def _array(self, name: str, transpose: bool) -> np.ndarray:
        values = self.weights.get(name)
        return np.ascontiguousarray(values.reshape(values.shape[0], -1).T) if transpose else values

    def _place(self, name: str, transpose: bool) -> tuple[int, int]:
        """(offset, length) of the tensor in the data file, writing it there the first time."""
        placed = self._placed.get((name, transpose))
        if placed is not None:
            return placed
        assert self._file is not None
        padding = -self._file.tell() % _ALIGN
        self._file.write(b"\0" * padding)
        self.on_bytes(padding)
        offset = self._file.tell()
        for block in self._blocks(name, transpose):
            self._file.write(np.ascontiguousarray(block, dtype="<f4").data)
            self.on_bytes(block.nbytes)
        self._placed[name, transpose] = offset, self._file.tell() - offset
        return self._placed[name, transpose]

    def _blocks(self, name: str, transpose: bool) -> Iterator[np.ndarray]:
        shape = self.shapes[name]
        if transpose or len(shape) != 2:
            yield self._array(name, transpose)
            return
        for _start, block in self.weights.row_blocks(name, max(1, _BLOCK_BYTES // (4 * shape[1]))):
            yield block


class Writer:
    """Saves networks under `root`, each in its directory (relative to `root`, as the networks are recorded), and
    records what each one takes and gives."""

    def __init__(self, weights: ModelWeights, shapes: dict[str, tuple[int, ...]], root: Path,
                 on_bytes: Progress, *, flat: bool = False) -> None:
        """`flat` puts every file straight into `root` instead of its directory."""
        self.weights, self.shapes, self.root, self.on_bytes, self.flat = weights, shapes, root, on_bytes, flat
        self.networks: dict[str, dict] = {}

    @contextlib.contextmanager
    def group(self, directory: str, name: str, tensors: list[str]) -> Iterator[Store]:
        """A store for networks that use `tensors`, external (`<name>.onnx.data`) when they are too large to
        sit in the graph files."""
        size = sum(4 * math.prod(self.shapes[n]) for n in tensors)
        with contextlib.ExitStack() as stack:
            data = None
            if size > EXTERNAL_DATA_BYTES:
                data = stack.enter_context(open(self._path(directory, f"{name}.onnx.data"), "wb"))
            yield Store(self.weights, self.shapes, data, self.on_bytes)

    def save(self, network: Graph, directory: str, stem: str | None = None) -> None:
        """Write `network` to `<stem>.onnx` in `directory` (stem: the network's name)."""
        path = self._path(directory, f"{stem or network.name}.onnx")
        onnx.save(network.model, path)
        self.on_bytes(path.stat().st_size)
        self.networks[network.name] = {"file": f"{directory}/{path.name}",
                                       "inputs": signature(network.graph.input),
                                       "outputs": signature(network.graph.output)}

    def _path(self, directory: str, name: str) -> Path:
        return self.root / name if self.flat else self.root / directory / name


def signature(values: list[onnx.ValueInfoProto]) -> list[list]:
    return [[value.name, [d.dim_value for d in value.type.tensor_type.shape.dim],
             helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name] for value in values]


# ---------------------------------------------------------------------------------------------------
# Building graphs


class Graph:
    """One network under construction, written straight into its ModelProto (no copies of the weights)."""

    def __init__(self, name: str, store: Store | None = None) -> None:
        self.name, self.store = name, store
        self.model = helper.make_model(helper.make_graph([], name, [], []), producer_name="vlhub",
                                       producer_version=__version__, opset_imports=[helper.make_opsetid("", OPSET)])
        self.model.ir_version = IR_VERSION
        self.graph = self.model.graph
        self._count = 0
        self._weights: set[str] = set()

    def input(self, name: str, dtype: int, shape: list[int]) -> str:
        self.graph.input.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def output(self, name: str, dtype: int, shape: list[int]) -> None:
        self.graph.output.append(helper.make_tensor_value_info(name, dtype, shape))

    def const(self, value: np.ndarray | float | list[int]) -> str:
        array = np.asarray(value, dtype=np.float32 if isinstance(value, float) else None)
        name = self._fresh("const")
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def weight(self, name: str, transpose: bool = False) -> str:
        assert self.store is not None
        if name not in self._weights:
            self.store.add(self.graph, name, transpose)
            self._weights.add(name)
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: object) -> str:
        return self.ops(op_type, inputs, [out], **attrs)[0]

    def ops(self, op_type: str, inputs: tuple[str, ...] | list[str], outputs: list[str | None],
            **attrs: object) -> list[str]:
        """A node with several outputs, named as given or fresh where None."""
        names = [name or self._fresh(op_type) for name in outputs]
        self.graph.node.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names

    def _fresh(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"


def linear(g: Graph, x: str, prefix: str, out: str | None = None) -> str:
    assert g.store is not None
    bias = prefix + ".bias"
    y = g.op("MatMul", x, g.weight(prefix + ".weight", transpose=True), out=None if g.store.has(bias) else out)
    return g.op("Add", y, g.weight(bias), out=out) if g.store.has(bias) else y


def rms_norm(g: Graph, x: str, weight: str, eps: float) -> str:
    mean = g.op("ReduceMean", g.op("Mul", x, x), axes=[-1], keepdims=1)
    return g.op("Mul", g.op("Div", x, g.op("Sqrt", g.op("Add", mean, g.const(eps)))), g.weight(weight))


def layer_norm(g: Graph, x: str, prefix: str, eps: float = 1e-6) -> str:
    centred = g.op("Sub", x, g.op("ReduceMean", x, axes=[-1], keepdims=1))
    variance = g.op("ReduceMean", g.op("Mul", centred, centred), axes=[-1], keepdims=1)
    normed = g.op("Div", centred, g.op("Sqrt", g.op("Add", variance, g.const(eps))))
    return g.op("Add", g.op("Mul", normed, g.weight(prefix + ".weight")), g.weight(prefix + ".bias"))


def silu(g: Graph, x: str) -> str:
    return g.op("Mul", x, g.op("Sigmoid", x))


def rotary(g: Graph, x: str, cos: str, sin: str, dim: int, out: str | None = None) -> str:
    """x * cos + rotate_half(x) * sin over the last axis."""
    first, second = g.ops("Split", (x, g.const([dim // 2, dim // 2])), [None, None], axis=-1)
    rotated = g.op("Concat", g.op("Neg", second), first, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin), out=out)


def attention(g: Graph, q: str, k: str, v: str, mask: str, dim: int) -> str:
    """Softmax(q k^T / sqrt(d) + mask) v over [1, heads, L, d] queries and [1, heads, T, d] keys, values."""
    scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), g.const(1 / math.sqrt(dim)))
    return g.op("MatMul", g.op("Softmax", g.op("Add", scores, mask), axis=-1), v)


# ---------------------------------------------------------------------------------------------------
# The vision transformer


def vision_width(config: dict) -> tuple[int, int]:
    """The vision blocks' width and heads."""
    cfg = config["vision_config"]
    return int(cfg.get("embed_dim") or cfg["hidden_size"]), int(cfg["num_heads"])


def vision_tower(g: Graph, config: dict, patches: int, pixels: str, cos: str, sin: str, full: str, window: str,
                 out: str | None = None) -> str:
    """Patch embedding, blocks and merger over `patches` padded rows of `pixels`, rotated by `cos`/`sin` [P, head
    dim]: additive masks `full` for the config's full-attention blocks, `window` for the others (where the family's
    blocks attend within windows); the merged tokens [P / merge unit, hidden]."""
    cfg = config["vision_config"]
    vision = config_family(config).vision
    width, heads = vision_width(config)
    dim = width // heads
    unit = cfg.get("spatial_merge_size", 2) ** 2
    x = g.op("MatMul", pixels, g.weight("visual.patch_embed.proj.weight", transpose=True))
    full_blocks = set(cfg.get("fullatt_block_indexes", []))

    def norm(x: str, prefix: str) -> str:
        return rms_norm(g, x, prefix + ".weight", 1e-6) if vision.norm == "rms" else layer_norm(g, x, prefix)

    for block in range(cfg["depth"]):
        p = f"visual.blocks.{block}."
        mask = full if not vision.window_attention or block in full_blocks else window
        qkv = g.op("Reshape", linear(g, norm(x, p + "norm1"), p + "attn.qkv"), g.const([patches, 3, heads, dim]))
        q, k, v = g.ops("Split", (g.op("Transpose", qkv, perm=[1, 2, 0, 3]), g.const([1, 1, 1])), [None] * 3, axis=0)
        q, k = (rotary(g, t, cos, sin, dim) for t in (q, k))
        attended = g.op("Transpose", attention(g, q, k, v, mask, dim), perm=[0, 2, 1, 3])
        x = g.op("Add", x, linear(g, g.op("Reshape", attended, g.const([patches, width])), p + "attn.proj"))
        h = norm(x, p + "norm2")
        if vision.mlp == "gated":
            act = g.op("Mul", silu(g, linear(g, h, p + "mlp.gate_proj")), linear(g, h, p + "mlp.up_proj"))
            x = g.op("Add", x, linear(g, act, p + "mlp.down_proj"))
        else:
            fc1 = linear(g, h, p + "mlp.fc1")
            x = g.op("Add", x, linear(g, g.op("Mul", fc1, g.op("Sigmoid", g.op("Mul", fc1, g.const(1.702)))),
                                      p + "mlp.fc2"))
    h = g.op("Reshape", norm(x, "visual.merger.ln_q"), g.const([patches // unit, unit * width]))
    h = linear(g, h, "visual.merger.mlp.0")
    gelu = g.op("Mul", g.op("Mul", h, g.const(0.5)),
                g.op("Add", g.op("Erf", g.op("Mul", h, g.const(1 / math.sqrt(2)))), g.const(1.0)))
    return linear(g, gelu, "visual.merger.mlp.2", out=out)
