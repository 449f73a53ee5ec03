"""ONNX networks of a Qwen2-VL / Qwen2.5-VL checkpoint in the sophon-demo / LLM-TPU layout (TPU-MLIR's old
flow: `model_transform.py` per file, then `model_deploy.py` and `model_tool --combine`).

    with ModelWeights.open(path) as weights:
        summary = export_onnx(weights, Path("deploy"), seq_length=2048, vision_patches=3136)

The graphs are built node by node with onnx.helper from `ModelWeights` (official names, float32): no torch,
no transformers. Files under `out/models/onnx/` (the caller stages `out`), S = seq_length, H, KV,
D = H / heads and V the text dims, P = vision_patches, all floats float32, opset 15, IR version 8:

    llm/block_{i}.onnx        input_states [1,S,H], position_ids [3,1,S] int64, attention_mask [1,1,S,S]
                              -> hidden_states [1,S,H], past_k, past_v [1,S,KV,D]
    llm/block_cache_{i}.onnx  input_states [1,1,H], position_ids [3,1,1] int64, attention_mask [1,1,1,S+1],
                              history_k, history_v [1,S,KV,D] -> hidden_states [1,1,H], past_k, past_v [1,1,KV,D]
    llm/embedding.onnx        input_ids [1,S] int32 -> hidden_states [1,S,H]
    llm/embedding_cache.onnx  input_ids [1,1] int32 -> hidden_states [1,1,H]
    llm/lm_head.onnx          hidden_states [1,H] -> m_logits [1,V]      (final RMSNorm, then lm_head)
    llm/greedy_head.onnx      m_logits [1,V] -> token [1,1] int64        (argmax)
    llm/penalty_sample_head.onnx  m_logits [1,V], input_ids [1,S] int64, top_p, temperature, penalty [1]
                              -> probs [1,50], token [1,50] int64
    vit/vision_transformer.onnx   network `vit`: input_states [P,1176], position_ids [P,2] int32 (row, column of
                              each patch),
                              Qwen2-VL:   attention_mask [1,P,P]
                              Qwen2.5-VL: full_attn_mask [1,1,P,P], window_attn_mask [1,1,P,P],
                                          reverse_index [P/4] int32
                              -> hidden_states [P/4, H]

Masks are additive (0 seen, -10000 masked). KV is sequence-major; the decode block returns only the new
token's K/V, which the runtime copies into slot `token_len - 1` of the history; its mask's last column is the
token itself. M-RoPE cos/sin for positions 0..S-1 are initializers gathered by position_ids, one row of
position_ids per mrope section; GQA repeats KV heads inside the graph.

The ViT takes patches padded to P rows. Its network is named `vit`, the name LLM-TPU's runtime looks it up by
(models/Qwen2_VL/python_demo/chat.cpp) and its old compile.sh gave it; the file keeps the name LLM-TPU's
export_onnx.py wrote. Qwen2-VL: patches in the processor's order, `attention_mask` 0 within each image
(frame), -10000 across. Qwen2.5-VL takes the newer llm_convert form, with its input names (TPU-MLIR
python/llm/Qwen2_5VLConverter.py): patches and position ids in window order (merge groups permuted by the
window index, as the runtime does on the host), `full_attn_mask` for the full-attention blocks
(fullatt_block_indexes: within each image), `window_attn_mask` for the others (within each window), and
after the merger `reverse_index` puts the tokens back in image order. Padding rows form a segment of their
own in both masks and are the last rows of the output.

A graph whose weights exceed EXTERNAL_DATA_BYTES (protobuf caps a file at 2 GB) keeps them in ONNX external
data, one file per group of networks sharing weights: `block_{i}.onnx.data` serves block_i and block_cache_i,
`embedding.onnx.data` the two embeddings and a tied lm_head.

Memory: networks are built and saved one at a time, each reading its tensors from `weights` as it needs them.
A network with its weights inside holds them about three times over while it is saved (the decoded tensor
being added, the proto, its serialisation): measured ~3x a layer's float32 size for block_i, and 2.9x the
table for an inline embedding. External weights are written a tensor at a time, tables in 64 MB row blocks.
Sources: sophgo/LLM-TPU models/Qwen2_VL/compile/export_onnx.py and compile.sh (the old flow's files, names and
shapes), TPU-MLIR python/llm/Qwen2VLConverter.py and Qwen2_5VLConverter.py (llm_convert's ViT).
"""

from __future__ import annotations

import contextlib
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from vlhub import __version__
from vlhub.atomic import ensure_free_space
from vlhub.errors import UserError
from vlhub.families import FAMILIES
from vlhub.formats.writers import file_entry
from vlhub.keymaps.config import text_config, tie_word_embeddings
from vlhub.sizes import config_family
from vlhub.smoke.inputs import DEVICE_MASKED
from vlhub.smoke.reference import inverse_frequencies, rotary_tables
from vlhub.smoke.weights import ModelWeights
from vlhub.targets.tpu_mlir.build import NAME

OPSET = 15  # what the sophon-demo / LLM-TPU exporters used
IR_VERSION = 8  # opset 15's; TPU-MLIR's onnxruntime 1.16 refuses IR versions above 9
MASK_VALUE = float(DEVICE_MASKED)
EXTERNAL_DATA_BYTES = 1_500_000_000
TOP_K = 50
MIN_TOKENS_TO_KEEP = 5
FILTERED_LOGIT = -1000.0  # what the sample head gives tokens top-p drops (LLM-TPU's PenaltySampleHead)
MODELS = "models"  # the directory under out that is written
LLM_DIR = "models/onnx/llm"
VIT_DIR = "models/onnx/vit"
VIT = "vit"  # the ViT network's name
VIT_STEM = "vision_transformer"  # its file's name
_ALIGN = 4096  # external tensors start on page boundaries, so runtimes can map them
_BLOCK_BYTES = 64 << 20  # an embedding or lm_head is streamed to external data this much at a time
_F32 = TensorProto.FLOAT
_I32 = TensorProto.INT32
_I64 = TensorProto.INT64

Progress = Callable[[int], None]


@dataclass(frozen=True)
class TextDims:
    """The text model's numbers the networks are built with."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    eps: float
    theta: float
    mrope_section: tuple[int, ...]

    @classmethod
    def from_config(cls, config: dict) -> TextDims:
        t = text_config(config)
        sections = tuple((t.get("rope_scaling") or {}).get("mrope_section", (16, 24, 24)))
        return cls(t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"],
                   t["hidden_size"] // t["num_attention_heads"], t["num_hidden_layers"], t["vocab_size"],
                   float(t["rms_norm_eps"]), float(t.get("rope_theta", 1000000.0)), sections)


def export_onnx(weights: ModelWeights, out: Path, *, seq_length: int, vision_patches: int,
                on_bytes: Progress | None = None) -> dict:
    """Write every network of the checkpoint behind `weights` under `out/models/onnx/` (see the module doc),
    one at a time, into `out/models`, which must not exist yet: the caller stages `out` (`vlhub convert --to tpu-mlir
    --onnx` builds the whole layout in one staging directory), and a failed export removes what it wrote.
    `on_bytes` is told the size of everything written.

    Returns `files` (path relative to `out` -> sha256, size) and `networks` (name -> its `file` and its
    `inputs` / `outputs` as [name, shape, dtype])."""
    FAMILIES[weights.family].route(NAME)  # the families llm_convert takes are the ones the ONNX flow does
    config = weights.config
    dims = TextDims.from_config(config)
    unit = config["vision_config"].get("spatial_merge_size", 2) ** 2
    if sum(dims.mrope_section) * 2 != dims.head_dim:
        raise UserError(f"mrope_section {list(dims.mrope_section)} does not cover head_dim {dims.head_dim}")
    if vision_patches < unit or vision_patches % unit:
        raise UserError(f"vision_patches must be a positive multiple of {unit} (one merged token each)")
    if seq_length < vision_patches // unit:
        raise UserError(f"seq_length {seq_length} cannot hold the {vision_patches // unit} tokens of the largest "
                        f"image ({vision_patches} patches)")
    out = Path(out)
    root = out / MODELS
    shapes = {step.target.name: step.target.shape for step in weights.plan.steps}
    tied = tie_word_embeddings(config)
    ensure_free_space(out, _estimated_bytes(shapes, tied), "the ONNX networks")
    (root / "onnx" / "llm").mkdir(parents=True)
    try:
        (root / "onnx" / "vit").mkdir()
        writer = _Writer(weights, shapes, root, on_bytes or (lambda _size: None))
        _write_text(writer, dims, seq_length, tied)
        with writer.group(VIT_DIR, VIT_STEM, [n for n in shapes if n.startswith("visual.")]) as store:
            writer.save(_vision_transformer(store, config, vision_patches), VIT_DIR, VIT_STEM)
        files = {f"{MODELS}/{path.relative_to(root).as_posix()}": file_entry(path)
                 for path in sorted(p for p in root.rglob("*") if p.is_file())}
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return {"files": files, "networks": writer.networks}


def network_file(network: str) -> str:
    """Where `export_onnx` writes a network, relative to its `out`."""
    return f"{VIT_DIR}/{VIT_STEM}.onnx" if network == VIT else f"{LLM_DIR}/{network}.onnx"


def _estimated_bytes(shapes: dict[str, tuple[int, ...]], tied: bool) -> int:
    """At most what the files take: a layer's weights in block_i and block_cache_i, the embedding in both
    embedding networks (and a tied lm_head), the rest once."""
    sizes = {name: 4 * math.prod(shape) for name, shape in shapes.items()}
    layers = sum(size for name, size in sizes.items() if name.startswith("model.layers."))
    return sum(sizes.values()) + layers + sizes["model.embed_tokens.weight"] * (2 if tied else 1)


def _write_text(writer: _Writer, dims: TextDims, seq: int, tied: bool) -> None:
    angles = np.arange(seq, dtype=np.float32)[:, None] * inverse_frequencies(dims.head_dim, dims.theta)
    rope = _Rope(*rotary_tables(angles), _mrope_selector(dims))
    for layer in range(dims.layers):
        prefix = f"model.layers.{layer}."
        with writer.group(LLM_DIR, f"block_{layer}", [n for n in writer.shapes if n.startswith(prefix)]) as store:
            for cache in (False, True):
                writer.save(_block(store, dims, layer, seq, rope, cache), LLM_DIR)
    embedding, norm = "model.embed_tokens.weight", "model.norm.weight"
    with writer.group(LLM_DIR, "embedding", [embedding, norm] if tied else [embedding]) as store:
        for name, length in (("embedding", seq), ("embedding_cache", 1)):
            writer.save(_embedding(store, name, length, dims), LLM_DIR)
        if tied:
            writer.save(_lm_head(store, dims, embedding), LLM_DIR)
    if not tied:
        with writer.group(LLM_DIR, "lm_head", ["lm_head.weight", norm]) as store:
            writer.save(_lm_head(store, dims, "lm_head.weight"), LLM_DIR)
    writer.save(_greedy_head(dims.vocab), LLM_DIR)
    writer.save(_penalty_sample_head(dims.vocab, seq), LLM_DIR)


class _Rope(NamedTuple):
    """The text rotary for positions 0..S-1 ([S, D] each) and which position row each column takes."""

    cos: np.ndarray
    sin: np.ndarray
    selector: np.ndarray


def _mrope_selector(dims: TextDims) -> np.ndarray:
    """[3, 1, 1, D] ones where a rotary column takes its angle from that row of position_ids (t, h, w): the
    sections of D/2 in turn, the same again for the second half (the reference's `_text_rotary`)."""
    selector = np.zeros((3, 1, 1, dims.head_dim), dtype=np.float32)
    bounds = np.cumsum([0, *dims.mrope_section])
    half = dims.head_dim // 2
    for i in range(len(dims.mrope_section)):
        selector[i % 3, ..., bounds[i]:bounds[i + 1]] = 1
        selector[i % 3, ..., half + bounds[i]:half + bounds[i + 1]] = 1
    return selector


# ---------------------------------------------------------------------------------------------------
# Writing


class _Store:
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
        tensor.name, tensor.data_type = name, _F32
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


class _Writer:
    """Saves networks under the staging directory (`root`, what becomes out/models) and records what each one
    takes and gives."""

    def __init__(self, weights: ModelWeights, shapes: dict[str, tuple[int, ...]], root: Path,
                 on_bytes: Progress, *, flat: bool = False) -> None:
        """`flat` puts every file straight into `root` instead of its models/ subdirectory."""
        self.weights, self.shapes, self.root, self.on_bytes, self.flat = weights, shapes, root, on_bytes, flat
        self.networks: dict[str, dict] = {}

    @contextlib.contextmanager
    def group(self, directory: str, name: str, tensors: list[str]) -> Iterator[_Store]:
        """A store for networks that use `tensors`, external (`<name>.onnx.data`) when they are too large to
        sit in the graph files."""
        size = sum(4 * math.prod(self.shapes[n]) for n in tensors)
        with contextlib.ExitStack() as stack:
            data = None
            if size > EXTERNAL_DATA_BYTES:
                data = stack.enter_context(open(self._path(directory, f"{name}.onnx.data"), "wb"))
            yield _Store(self.weights, self.shapes, data, self.on_bytes)

    def save(self, network: _Graph, directory: str, stem: str | None = None) -> None:
        """Write `network` to `<stem>.onnx` in `directory` (stem: the network's name)."""
        path = self._path(directory, f"{stem or network.name}.onnx")
        onnx.save(network.model, path)
        self.on_bytes(path.stat().st_size)
        self.networks[network.name] = {"file": f"{directory}/{path.name}",
                                       "inputs": _signature(network.graph.input),
                                       "outputs": _signature(network.graph.output)}

    def _path(self, directory: str, name: str) -> Path:
        return self.root / name if self.flat else self.root / Path(directory).relative_to(MODELS) / name


def _signature(values: list[onnx.ValueInfoProto]) -> list[list]:
    return [[value.name, [d.dim_value for d in value.type.tensor_type.shape.dim],
             helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name] for value in values]


# ---------------------------------------------------------------------------------------------------
# Building graphs


class _Graph:
    """One network under construction, written straight into its ModelProto (no copies of the weights)."""

    def __init__(self, name: str, store: _Store | None = None) -> None:
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


def _linear(g: _Graph, x: str, prefix: str, out: str | None = None) -> str:
    assert g.store is not None
    bias = prefix + ".bias"
    y = g.op("MatMul", x, g.weight(prefix + ".weight", transpose=True), out=None if g.store.has(bias) else out)
    return g.op("Add", y, g.weight(bias), out=out) if g.store.has(bias) else y


def _rms_norm(g: _Graph, x: str, weight: str, eps: float) -> str:
    mean = g.op("ReduceMean", g.op("Mul", x, x), axes=[-1], keepdims=1)
    return g.op("Mul", g.op("Div", x, g.op("Sqrt", g.op("Add", mean, g.const(eps)))), g.weight(weight))


def _layer_norm(g: _Graph, x: str, prefix: str, eps: float = 1e-6) -> str:
    centred = g.op("Sub", x, g.op("ReduceMean", x, axes=[-1], keepdims=1))
    variance = g.op("ReduceMean", g.op("Mul", centred, centred), axes=[-1], keepdims=1)
    normed = g.op("Div", centred, g.op("Sqrt", g.op("Add", variance, g.const(eps))))
    return g.op("Add", g.op("Mul", normed, g.weight(prefix + ".weight")), g.weight(prefix + ".bias"))


def _silu(g: _Graph, x: str) -> str:
    return g.op("Mul", x, g.op("Sigmoid", x))


def _rotary(g: _Graph, x: str, cos: str, sin: str, dim: int, out: str | None = None) -> str:
    """x * cos + rotate_half(x) * sin over the last axis."""
    first, second = g.ops("Split", (x, g.const([dim // 2, dim // 2])), [None, None], axis=-1)
    rotated = g.op("Concat", g.op("Neg", second), first, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin), out=out)


def _attention(g: _Graph, q: str, k: str, v: str, mask: str, dim: int) -> str:
    """Softmax(q k^T / sqrt(d) + mask) v over [1, heads, L, d] queries and [1, heads, T, d] keys, values."""
    scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), g.const(1 / math.sqrt(dim)))
    return g.op("MatMul", g.op("Softmax", g.op("Add", scores, mask), axis=-1), v)


# ---------------------------------------------------------------------------------------------------
# The text networks


def _block(store: _Store, dims: TextDims, layer: int, seq: int, rope: _Rope, cache: bool) -> _Graph:
    """block_{layer} (the prompt, S tokens) or block_cache_{layer} (one token after an S-slot history)."""
    g = _Graph(f"block_cache_{layer}" if cache else f"block_{layer}", store)
    length, keys = (1, seq + 1) if cache else (seq, seq)
    kv = [1, length, dims.kv_heads, dims.head_dim]
    x = g.input("input_states", _F32, [1, length, dims.hidden])
    positions = g.input("position_ids", _I64, [3, 1, length])
    mask = g.input("attention_mask", _F32, [1, 1, length, keys])
    history = [g.input(name, _F32, [1, seq, dims.kv_heads, dims.head_dim])
               for name in (("history_k", "history_v") if cache else ())]
    cos, sin = (_mrope(g, table, rope.selector, positions) for table in (rope.cos, rope.sin))
    p = f"model.layers.{layer}."
    h = _rms_norm(g, x, p + "input_layernorm.weight", dims.eps)
    q, k = (g.op("Reshape", _linear(g, h, f"{p}self_attn.{n}_proj"), g.const([1, length, heads, dims.head_dim]))
            for n, heads in (("q", dims.heads), ("k", dims.kv_heads)))
    v = g.op("Reshape", _linear(g, h, p + "self_attn.v_proj"), g.const(kv), out="past_v")
    q = _rotary(g, q, cos, sin, dims.head_dim)
    k = _rotary(g, k, cos, sin, dims.head_dim, out="past_k")
    if history:
        k, v = (g.op("Concat", old, new, axis=1) for old, new in zip(history, (k, v)))
    k, v = (_heads_major(g, t, dims) for t in (k, v))
    attended = _attention(g, g.op("Transpose", q, perm=[0, 2, 1, 3]), k, v, mask, dims.head_dim)
    attended = g.op("Reshape", g.op("Transpose", attended, perm=[0, 2, 1, 3]), g.const([1, length, dims.hidden]))
    x = g.op("Add", x, _linear(g, attended, p + "self_attn.o_proj"))
    h = _rms_norm(g, x, p + "post_attention_layernorm.weight", dims.eps)
    act = g.op("Mul", _silu(g, _linear(g, h, p + "mlp.gate_proj")), _linear(g, h, p + "mlp.up_proj"))
    g.op("Add", x, _linear(g, act, p + "mlp.down_proj"), out="hidden_states")
    g.output("hidden_states", _F32, [1, length, dims.hidden])
    g.output("past_k", _F32, kv)
    g.output("past_v", _F32, kv)
    return g


def _mrope(g: _Graph, table: np.ndarray, selector: np.ndarray, positions: str) -> str:
    """The table's rows for the t, h and w positions, each column from its section's row: [1, L, 1, D]."""
    rows = g.op("Gather", g.const(table), positions, axis=0)  # [3, 1, L, D]
    mixed = g.op("ReduceSum", g.op("Mul", rows, g.const(selector)), g.const([0]), keepdims=0)
    return g.op("Unsqueeze", mixed, g.const([2]))


def _heads_major(g: _Graph, t: str, dims: TextDims) -> str:
    """Sequence-major [1, T, KV, D] keys or values as [1, heads, T, D], each KV head serving heads/KV queries."""
    t = g.op("Transpose", t, perm=[0, 2, 1, 3])
    group = dims.heads // dims.kv_heads
    if group == 1:
        return t
    t = g.op("Expand", g.op("Unsqueeze", t, g.const([2])), g.const([1, 1, group, 1, 1]))
    return g.op("Reshape", t, g.const([1, dims.heads, -1, dims.head_dim]))


def _embedding(store: _Store, name: str, length: int, dims: TextDims) -> _Graph:
    g = _Graph(name, store)
    ids = g.input("input_ids", _I32, [1, length])
    g.op("Gather", g.weight("model.embed_tokens.weight"), ids, axis=0, out="hidden_states")
    g.output("hidden_states", _F32, [1, length, dims.hidden])
    return g


def _lm_head(store: _Store, dims: TextDims, head: str) -> _Graph:
    g = _Graph("lm_head", store)
    x = g.input("hidden_states", _F32, [1, dims.hidden])
    h = _rms_norm(g, x, "model.norm.weight", dims.eps)
    g.op("Gemm", h, g.weight(head), transB=1, out="m_logits")  # [V, H] as stored: streamed, never transposed
    g.output("m_logits", _F32, [1, dims.vocab])
    return g


def _greedy_head(vocab: int) -> _Graph:
    g = _Graph("greedy_head")
    g.op("ArgMax", g.input("m_logits", _F32, [1, vocab]), axis=1, keepdims=1, out="token")
    g.output("token", _I64, [1, 1])
    return g


def _penalty_sample_head(vocab: int, seq: int) -> _Graph:
    """LLM-TPU's PenaltySampleHead: logits of the ids in `input_ids` divided by `penalty` (multiplied where
    negative), the top 50, divided by `temperature`, softmax; tokens past cumulative `top_p` get -1000 (the
    first 5 always stay); softmax again. The caller samples a token from `probs` over `token`."""
    g = _Graph("penalty_sample_head")
    logits = g.input("m_logits", _F32, [1, vocab])
    ids = g.input("input_ids", _I64, [1, seq])
    top_p, temperature, penalty = (g.input(n, _F32, [1]) for n in ("top_p", "temperature", "penalty"))
    seen = g.op("GatherElements", logits, ids, axis=1)
    penalised = g.op("Where", g.op("Less", seen, g.const(0.0)), g.op("Mul", seen, penalty), g.op("Div", seen, penalty))
    logits = g.op("ScatterElements", logits, ids, penalised, axis=1)  # repeated ids write the same value
    top, _ = g.ops("TopK", (logits, g.const([TOP_K])), [None, "token"], axis=1)
    top = g.op("Div", top, temperature)
    cumulative = g.op("CumSum", g.op("Softmax", top, axis=1), g.const(np.array(1, dtype=np.int64)))
    # the first MIN_TOKENS_TO_KEEP always pass: their cumulative sums are lowered below any top_p (TPU-MLIR's ONNX
    # front end cannot take a boolean Or with a constant operand)
    always = g.const(np.where(np.arange(TOP_K)[None] < MIN_TOKENS_TO_KEEP, 1e4, 0.0).astype(np.float32))
    kept = g.op("Less", g.op("Sub", cumulative, always), top_p)
    g.op("Softmax", g.op("Where", kept, top, g.const(FILTERED_LOGIT)), axis=1, out="probs")
    g.output("probs", _F32, [1, TOP_K])
    g.output("token", _I64, [1, TOP_K])
    return g


# ---------------------------------------------------------------------------------------------------
# The vision network


def _vision_transformer(store: _Store, config: dict, patches: int, *, vacc: bool = False) -> _Graph:
    """Patch embedding, blocks and merger over P padded patch rows (see the module doc for the inputs; with
    `vacc`, VastAI's form instead: see `export_vacc_vision`)."""
    cfg = config["vision_config"]
    vision = config_family(config).vision
    # window attention comes with llm_convert's names and forms of the masks (TPU-MLIR python/llm/Qwen2_5VLConverter.py)
    windows = vision.window_attention
    width, heads = int(cfg.get("embed_dim") or cfg["hidden_size"]), cfg["num_heads"]
    dim = width // heads
    unit = cfg.get("spatial_merge_size", 2) ** 2
    patch_values = math.prod(store.shapes["visual.patch_embed.proj.weight"][1:])
    g = _Graph(VIT, store)
    if vacc:
        pixels = g.input("pixel_values", _F32, [patches, patch_values])
        # vacc masks say 1 (attend) or 0, as the boolean mask its SDPA takes
        masks = [g.op("Mul", g.op("Sub", g.input(name, _F32, [1, patches, patches]), g.const(1.0)),
                      g.const(-MASK_VALUE)) for name in ("attention_mask", "window_attention_mask")[: 1 + windows]]
        full, window = masks[0], masks[-1]
        cos, sin = (g.input(name, _F32, [patches, dim]) for name in ("cos", "sin"))
    else:
        pixels = g.input("input_states", _F32, [patches, patch_values])
        positions = g.input("position_ids", _I32, [patches, 2])
        mask_shape = [1, 1, patches, patches] if windows else [1, patches, patches]
        full = g.input("full_attn_mask" if windows else "attention_mask", _F32, mask_shape)
        if windows:
            window = g.input("window_attn_mask", _F32, mask_shape)
            reverse = g.input("reverse_index", _I32, [patches // unit])
        # rows and columns are below P; each gathers D/4 angles, and (row, column) repeated makes the D-wide table
        angles = np.arange(patches, dtype=np.float32)[:, None] * inverse_frequencies(dim // 2, 10000.0)
        tables = []
        for function in (np.cos, np.sin):
            half = g.op("Reshape", g.op("Gather", g.const(function(angles)), positions, axis=0),
                        g.const([patches, dim // 2]))
            tables.append(g.op("Concat", half, half, axis=-1))
        cos, sin = tables
    x = g.op("MatMul", pixels, g.weight("visual.patch_embed.proj.weight", transpose=True))
    full_blocks = set(cfg.get("fullatt_block_indexes", []))

    def norm(x: str, prefix: str) -> str:
        return _rms_norm(g, x, prefix + ".weight", 1e-6) if vision.norm == "rms" else _layer_norm(g, x, prefix)

    for block in range(cfg["depth"]):
        p = f"visual.blocks.{block}."
        mask = full if not windows or block in full_blocks else window
        qkv = g.op("Reshape", _linear(g, norm(x, p + "norm1"), p + "attn.qkv"), g.const([patches, 3, heads, dim]))
        q, k, v = g.ops("Split", (g.op("Transpose", qkv, perm=[1, 2, 0, 3]), g.const([1, 1, 1])), [None] * 3, axis=0)
        q, k = (_rotary(g, t, cos, sin, dim) for t in (q, k))
        attended = g.op("Transpose", _attention(g, q, k, v, mask, dim), perm=[0, 2, 1, 3])
        x = g.op("Add", x, _linear(g, g.op("Reshape", attended, g.const([patches, width])), p + "attn.proj"))
        h = norm(x, p + "norm2")
        if vision.mlp == "gated":
            act = g.op("Mul", _silu(g, _linear(g, h, p + "mlp.gate_proj")), _linear(g, h, p + "mlp.up_proj"))
            x = g.op("Add", x, _linear(g, act, p + "mlp.down_proj"))
        else:
            fc1 = _linear(g, h, p + "mlp.fc1")
            x = g.op("Add", x, _linear(g, g.op("Mul", fc1, g.op("Sigmoid", g.op("Mul", fc1, g.const(1.702)))),
                                       p + "mlp.fc2"))
    h = g.op("Reshape", norm(x, "visual.merger.ln_q"), g.const([patches // unit, unit * width]))
    h = _linear(g, h, "visual.merger.mlp.0")
    gelu = g.op("Mul", g.op("Mul", h, g.const(0.5)),
                g.op("Add", g.op("Erf", g.op("Mul", h, g.const(1 / math.sqrt(2)))), g.const(1.0)))
    output = "image_embeds" if vacc else "hidden_states"
    reordered = windows and not vacc  # vacc puts the tokens back in image order on the host
    merged = _linear(g, gelu, "visual.merger.mlp.2", out=None if reordered else output)
    if reordered:
        g.op("Gather", merged, reverse, axis=0, out=output)
    g.output(output, _F32, [patches // unit, store.shapes["visual.merger.mlp.2.weight"][0]])
    return g


def export_vacc_vision(weights: ModelWeights, out: Path, patches: int, on_bytes: Progress | None = None) -> Path:
    """The vision tower and merger as VastAI's vamc takes them, in `out/vision_transformer.onnx`:

        pixel_values [N,1176], attention_mask [1,N,N] (1 attend, 0 not), cos, sin [N, head_dim]
        (Qwen2.5-VL: also window_attention_mask [1,N,N], for the blocks outside fullatt_block_indexes)
        -> image_embeds [N/4, hidden]

    The names are the vendor's, not llm_convert's full_attn_mask: VastModelZOO's visual yamls' frontend.shape
    and vlm/qwen2_vl/build_in/source_code/export_onnx.py's input_names are pixel_values, attention_mask, cos,
    sin. Qwen2.5-VL's second mask is vlhub's: the vendor's vision forward (modeling_qwen2_5_vl_vacc.py) passes
    one attention_mask to every block, and its yaml lists fullatt_block_indexes for vamc, which applies them
    in a way that is not public.

    Patches padded to N rows; the host builds cos/sin (`vision_rotary`) and the block-diagonal masks and, for
    Qwen2.5-VL, orders patches by window and the output back. vamc compiles its own export of the vendor's
    modeling; this one checks the numbers that form implies."""
    config = weights.config
    shapes = {step.target.name: step.target.shape for step in weights.plan.steps}
    out.mkdir(parents=True, exist_ok=True)
    writer = _Writer(weights, shapes, out, on_bytes or (lambda _size: None), flat=True)
    with writer.group(VIT_DIR, VIT_STEM, [n for n in shapes if n.startswith("visual.")]) as store:
        writer.save(_vision_transformer(store, config, patches, vacc=True), VIT_DIR, VIT_STEM)
    return out / f"{VIT_STEM}.onnx"
