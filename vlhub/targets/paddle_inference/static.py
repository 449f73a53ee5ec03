"""Static graphs of the families for Paddle Inference on CPU, and a predictor that runs them.

    summary = export_static(Path("qwen2-vl-2b-paddle"), Path("deploy"), dtype="bfloat16", max_seq_len=4096)
    predictor = StaticPredictor(Path("deploy/checkpoints"), Path("qwen2-vl-2b-paddle"))
    image_embeds = predictor.encode_images(pixel_values, **vision_inputs)
    prompt_logits, tokens = predictor.generate(input_ids, position_ids, image_embeds, image_mask, 8, positions_after)

Files under `out_dir/checkpoints/`, `<prefix>` being `qwen` for Qwen-VL (PaddleNLP's `--model_prefix qwen`)
and `model` for Qwen2(.5)-VL (the default of PaddleNLP's StaticGraphPredictor); ir="pir" writes `.json`
programs, ir="legacy" `.pdmodel` ones plus `.pdiparams.info`:

    encode_image/vision.{json|pdmodel}, vision.pdiparams       the vision tower
    encode_text/<prefix>_layer_<i>.{json|pdmodel}, .pdiparams  decoder layer i: the prefill and every decode step
    encode_text/<prefix>_head_<j>.{json|pdmodel}, .pdiparams   the final norm and block j of the output projection
    encode_text/config.json     the weights' config.json plus infer_model_{max_seq_len,dtype,head_blocks,paddle_commit}

The graphs' inputs and outputs, by their fixed names (floats float32, indices int64):

    vision   pixel_values          Qwen2(.5)-VL: patches [N, 3*T*P*P]; Qwen-VL: images [B, 3, S, S]
             vision_position_ids   [N, 2], full_mask [N, N]                              Qwen2(.5)-VL
             window_index, reverse_index [N/4], window_mask [N, N]                       Qwen2.5-VL
             (a Qwen2.5-VL whose blocks all read one mask takes only that one)
             interp_indices [N, 4] (int), interp_weights [N, 4]: position-table taps    Qwen3-VL
          -> image_embeds          [image tokens, hidden]; with DeepStack (Qwen3-VL) [1 + k, image tokens, hidden]:
                                   the main embeddings, then the k DeepStack features
    layer i  hidden_states [L, hidden] (layer 0: the host's embeddings), position_ids [3, L] (M-RoPE) or [L]
             (Qwen-VL), past_key_values [2, kv_heads, T, head_dim],
             deepstack_embeds [L, hidden] for i < k with DeepStack: feature i at the image positions (zeros
             elsewhere and while decoding; the host scatters it), added to the layer's output
          -> layer_output [L, hidden], present_key_values [2, kv_heads, T + L, head_dim]
    head j   hidden_states [L, hidden] (the last layer's output)
          -> logits [L, entries of block j] (every position, which a smoke test compares); joined in order, [L, vocab]

Each layer's graph serves both phases, so its weights are held once: the prefill passes the prompt with an
empty cache (T = 0), each decode step one token (L = 1) with the cache so far. Its attention is causal over
the L new tokens, each of which also sees all T cached ones. The KV cache holds the layer's rotated keys,
then its values, head-major like PaddleNLP's per-layer `cache_kvs` [2, batch, heads, max_len, head_dim].
Tokens are embedded on the host from the weights' own table and image embeddings merged there, so the
graphs start from the embeddings and the table is not stored twice. A graph per layer and per block of the
output projection (at most `HEAD_BLOCK_BYTES`) is what lets a predictor hold one part of the model: created,
run and released in turn, Paddle Inference's memory stays at one layer whatever the model's size (docs/
targets/paddle-inference.md#per-block-graphs).

Parameters are stored in the export dtype and cast to float32 where the graph uses them; everything is
computed in float32, so graphs over the source's values agree with the numpy reference within the
"exact" smoke tolerance. The parameters are the network's, named in the family's Paddle layout (`[paddle]`), the
kinds its Paddle loader transposes as it reads them (`transpose_at_load`) written transposed so; the weights
directory is read in that layout's format (pdparams, or PaddleFormers' safetensors). The programs are traced
from `paddle_forward`'s networks built under `paddle.LazyGuard` (nothing allocated); the `.pdiparams` files are
written here in Paddle's format, one tensor at a time from the lazy reader (the output projection a block at a
time), so memory holds one decoder weight, never the model.
Sources: PaddleMIX deploy/qwen_vl/ (file names, the `<path>.pdmodel` its predictor opens), PaddleNLP's
StaticGraphPredictor (prefixes), Paddle Inference's Config (either IR from explicit paths).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pickle
import shutil
import struct
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import paddle
from paddle import nn
from paddle.base.framework import Variable
from paddle.base.layer_helper import LayerHelper
from paddle.base.proto import framework_pb2
from paddle.framework.io_utils import is_persistable
from paddle.static import InputSpec
from paddle.static.pir_io import append_pir_fetch_ops, get_pir_parameters

from vlhub.atomic import ensure_free_space
from vlhub.convert.layouts import detect_layout, embedding_candidates
from vlhub.convert.ops import cast_float, swapped_shape, transpose_last
from vlhub.convert.pipeline import ordered_steps, read_source
from vlhub.convert.plan import Plan, Step, plan_conversion
from vlhub.errors import CheckFailed, UserError
from vlhub.family_registry import FAMILIES
from vlhub.formats.readers import Checkpoint, open_checkpoint
from vlhub.formats.tensors import dtype_info, float32_values, logical_dtype
from vlhub.formats.writers import file_entry, write_json_atomic
from vlhub.keymaps import Layout
from vlhub.smoke.paddle_forward import (
    MASKED,
    PaddleFamily,
    TextModel,
    as_float32,
    family_network,
    paddle_layout,
    weights_entry,
)
from vlhub.targets.paddle_inference import NAME

CHECKPOINTS = "checkpoints"  # the directory under out_dir that holds the graphs
IRS = ("pir", "legacy")
DTYPES = ("float16", "bfloat16", "float32")
VISION_OUTPUTS = ("image_embeds",)
_MASKS = ("full_mask", "window_mask")  # a Qwen2.5-VL graph takes only the ones its blocks read
LAYER_OUTPUTS = ("layer_output", "present_key_values")
HEAD_OUTPUTS = ("logits",)
# the most bytes of the output projection one head graph holds: Paddle Inference casts a weight to float32 where it
# is used, so running it takes this, three times over for bfloat16 (72B-shaped: a 2.49 GB lm_head in 10 graphs)
HEAD_BLOCK_BYTES = 256 << 20
_INT_INPUTS = frozenset({"vision_position_ids", "window_index", "reverse_index", "interp_indices", "position_ids"})
_PROTO_DTYPES = {"float16": framework_pb2.VarType.FP16, "bfloat16": framework_pb2.VarType.BF16,
                 "float32": framework_pb2.VarType.FP32}
_IR_GUARDS = {"pir": paddle.pir_utils.DygraphPirGuard, "legacy": paddle.pir_utils.DygraphOldIrGuard}
# os.pwrite moves at most this many bytes per call on Linux
_WRITE_CHUNK = 1 << 30

Status = Callable[[str], None]
T = TypeVar("T")


def graph_prefix(family: str) -> str:
    """The text graphs' file prefix: the family's `text_prefix` (the one its PaddleNLP deploy script names)."""
    return FAMILIES[family].route(NAME)["text_prefix"]


# ---------------------------------------------------------------------------------------------------
# The graphs


class _LayerStep(nn.Layer):
    """Decoder layer `index` over L new tokens after a cache of T (T = 0 for the prefill): its input [L, hidden] in,
    its output and its keys and values extended by the new tokens' [2, kv_heads, T + L, head_dim] out."""

    def __init__(self, text: TextModel, index: int) -> None:
        super().__init__()
        self.text, self.index = text, index  # the text model for its rotary table; only layer `index` is traced

    def forward(self, hidden_states: paddle.Tensor, position_ids: paddle.Tensor,
                past_key_values: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        return self.run(hidden_states, position_ids, past_key_values, None)

    def run(self, h: paddle.Tensor, position_ids: paddle.Tensor, past_key_values: paddle.Tensor,
            deepstack_embeds: paddle.Tensor | None) -> tuple[paddle.Tensor, paddle.Tensor]:
        cos, sin = self.text.rotary(position_ids)
        mask = _cached_causal_mask(paddle.shape(h)[0], paddle.shape(past_key_values)[2])
        layer = getattr(self.text, self.text.layers_key)[self.index]
        h, cache = layer.step(h, cos, sin, mask, (past_key_values[0], past_key_values[1]))
        if deepstack_embeds is not None:
            h = add_deepstack(h, deepstack_embeds)
        return h, paddle.stack(cache)


class _DeepStackLayerStep(_LayerStep):
    """`_LayerStep` of a decoder layer whose output gains a DeepStack feature: `deepstack_embeds` [L, hidden] (the host
    scatters the feature to the image positions, zeros elsewhere and while decoding)."""

    def forward(self, hidden_states: paddle.Tensor, position_ids: paddle.Tensor, past_key_values: paddle.Tensor,
                deepstack_embeds: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        return self.run(hidden_states, position_ids, past_key_values, deepstack_embeds)


def add_deepstack(h: paddle.Tensor, features: paddle.Tensor) -> paddle.Tensor:
    """A decoder layer's output [L, hidden] plus its DeepStack features [L, hidden] (zeros off the image)."""
    return h + features


class _HeadBlock(nn.Layer):
    """The final norm and one block of the output projection: the last layer's output [L, hidden] in, the logits of
    the block's vocabulary entries out. Its weight is a parameter of its own, the block's part of lm_head ([hidden,
    block]) or of the tied embedding ([block, hidden]), so the graph holds only that part."""

    def __init__(self, text: TextModel, shape: list[int], tied: bool) -> None:
        super().__init__()
        self.text, self.tied = text, tied
        self.weight = self.create_parameter(shape)

    def forward(self, hidden_states: paddle.Tensor) -> paddle.Tensor:
        return paddle.matmul(self.text.final_norm(hidden_states), as_float32(self.weight), transpose_y=self.tied)


def _cached_causal_mask(new: paddle.Tensor, cached: paddle.Tensor) -> paddle.Tensor:
    """The additive mask [new, cached + new]: new token i sees every cached token and new tokens 0..i."""
    keys = paddle.arange(cached + new)
    queries = paddle.arange(new) + cached
    return (keys.unsqueeze(0) > queries.unsqueeze(1)).astype("float32") * MASKED


@dataclass(frozen=True)
class _Block:
    """Where a head graph's weight comes from: entries [start, stop) along `axis` of the network's tensor `name`."""

    name: str
    axis: int
    start: int
    stop: int


@dataclass(frozen=True)
class _Graph:
    """One static graph: where it goes, what is traced, its inputs and its outputs' names, and (a head graph) the
    block of the output projection its weight `block[0]` (a variable name) holds."""

    directory: str
    name: str
    function: Callable  # a Layer's bound method, so tracing finds the parameters
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...]
    block: tuple[str, _Block] | None = None


def _lazy_graphs(network: PaddleFamily, family: str, dtype: str, head_bytes: int) -> tuple[nn.Layer, list[_Graph]]:
    """The family's network with `dtype` parameters that have names and shapes but no memory, and its graphs: the
    vision tower, each decoder layer, and the output projection in blocks of at most `head_bytes`."""
    previous = paddle.get_default_dtype()
    paddle.set_default_dtype(dtype)
    try:
        # fresh variable names (linear_0.w_0, ...): the same checkpoint always gives the same files
        with paddle.LazyGuard(), paddle.utils.unique_name.guard():
            net = network.build()
            text, head = network.text_model(net), network.head(net)
            # the head's vocabulary axis: lm_head is [hidden, vocab], a tied embedding [vocab, hidden]
            axis = 0 if network.tied else 1
            size = max(1, head_bytes // (network.hidden * dtype_info(dtype).itemsize))
            heads = []
            for start in range(0, network.vocab, size):
                shape = list(head.shape)
                shape[axis] = min(size, network.vocab - start)
                heads.append((_HeadBlock(text, shape, network.tied), start, start + shape[axis]))
    finally:
        paddle.set_default_dtype(previous)
    net.eval()
    vision, vision_inputs = network.vision_graph(net)
    prefix = graph_prefix(family)
    graphs = [_Graph("encode_image", "vision", vision, tuple(vision_inputs), VISION_OUTPUTS)]
    for index in range(network.layers):
        inputs = (InputSpec([None, network.hidden], "float32", "hidden_states"),
                  InputSpec(list(network.positions_shape(None)), "int64", "position_ids"),
                  InputSpec(_cache_shape(network, None), "float32", "past_key_values"))
        step = _LayerStep(text, index)
        if index < network.deepstack:
            step = _DeepStackLayerStep(text, index)
            inputs += (InputSpec([None, network.hidden], "float32", "deepstack_embeds"),)
        graphs.append(_Graph("encode_text", f"{prefix}_layer_{index}", step.forward, inputs, LAYER_OUTPUTS))
    for number, (block, start, stop) in enumerate(heads):
        block.eval()
        graphs.append(_Graph("encode_text", f"{prefix}_head_{number}", block.forward,
                             (InputSpec([None, network.hidden], "float32", "hidden_states"),), HEAD_OUTPUTS,
                             (block.weight.name, _Block(head.name, axis, start, stop))))
    return net, graphs


def _cache_shape(network: PaddleFamily, tokens: int | None) -> list[int | None]:
    """One decoder layer's KV cache shape for `tokens` tokens: [2 (keys, values), kv_heads, tokens, head_dim]."""
    return [2, network.kv_heads, tokens, network.head_dim]


# ---------------------------------------------------------------------------------------------------
# Programs


@dataclass(frozen=True)
class _Param:
    """A persistable tensor a program reads: its variable name, logical dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * dtype_info(self.dtype).itemsize

    def header(self) -> bytes:
        """What precedes the tensor's data in a .pdiparams: version, LoD levels (none), version, TensorDesc."""
        desc = framework_pb2.VarType.TensorDesc(data_type=_PROTO_DTYPES[self.dtype], dims=self.shape)
        encoded = desc.SerializeToString()
        return struct.pack("<IQIi", 0, 0, 0, len(encoded)) + encoded


def _save_program(graph: _Graph, prefix: Path, ir: str) -> list[_Param]:
    """Trace a graph, write its program beside `prefix` and return the persistables it reads, in name order."""
    with _old_ir_builders() if ir == "legacy" else contextlib.nullcontext(), warnings.catch_warnings():
        # the legacy IR's fill_constant warns that an attribute it sets itself is deprecated
        warnings.filterwarnings("ignore", message=r"The Attr\(force_cpu\)")
        concrete = paddle.jit.to_static(graph.function, input_spec=list(graph.inputs), full_graph=True).concrete_program
    paddle.enable_static()  # programs are normalised and serialised in static mode, as jit.save does
    try:
        if ir == "legacy":
            program = concrete.main_program.clone()
            block = program.global_block()
            for var, name in zip(concrete.outputs, graph.outputs):
                block._rename_var(var.name, name)
            program = paddle.static.normalize_program(program, [block.var(spec.name) for spec in graph.inputs],
                                                      [block.var(name) for name in graph.outputs])
            prefix.with_suffix(".pdmodel").write_bytes(
                program._remove_training_info(clip_extra=True).desc.serialize_to_string())
            persistables = [var for var in program.list_vars() if is_persistable(var)]
        else:
            feeds = [value for value in concrete.inputs if isinstance(value, paddle.pir.Value)]
            program = paddle.static.normalize_program(concrete.main_program, feeds, list(concrete.outputs))
            block = program.global_block()
            fetches = [op for op in block.ops if op.name() == "pd_op.fetch"]
            values = [op.operand_source(0) for op in fetches]
            for op in fetches:  # normalisation names the outputs fetch_name_<i>: name them
                block.remove_op(op)
            with paddle.static.program_guard(program):
                append_pir_fetch_ops(program, list(zip(values, graph.outputs)))
            paddle.core.serialize_pir_program(program, str(prefix.with_suffix(".json")), True, False, True)
            persistables = get_pir_parameters(program)[0]
        params = [_Param(var.name, _dtype_name(var.dtype), tuple(var.shape)) for var in persistables]
    finally:
        paddle.disable_static()
    return sorted(params, key=lambda param: param.name)  # Paddle's order in a .pdiparams


def _old_ir_op(op_type: str, inputs: dict[str, Variable], attrs: dict | None = None) -> Variable:
    helper = LayerHelper(op_type)
    out = helper.create_variable_for_type_inference(next(iter(inputs.values())).dtype)
    helper.append_op(type=op_type, inputs=inputs, outputs={"Out": out}, attrs=attrs or {})
    return out


@paddle.jit.not_to_static
def _matmul(x: Variable, y: Variable, transpose_x: bool = False, transpose_y: bool = False,
            name: str | None = None) -> Variable:
    return _old_ir_op("matmul_v2", {"X": x, "Y": y}, {"trans_x": transpose_x, "trans_y": transpose_y})


@paddle.jit.not_to_static
def _gelu(x: Variable, approximate: bool = False, name: str | None = None) -> Variable:
    return _old_ir_op("gelu", {"X": x}, {"approximate": approximate})


@paddle.jit.not_to_static
def _sum(x: Variable, axis: int | list[int] | None = None, dtype: str | None = None, keepdim: bool = False,
         name: str | None = None) -> Variable:
    if dtype is not None:
        raise NotImplementedError("sum(dtype=...) while tracing for the legacy IR")
    dims = [] if axis is None else [axis] if isinstance(axis, int) else list(axis)
    return _old_ir_op("reduce_sum", {"X": x}, {"dim": dims, "keep_dim": keepdim, "reduce_all": axis is None})


def _unary(op_type: str) -> Callable[..., Variable]:
    @paddle.jit.not_to_static
    def build(x: Variable, name: str | None = None) -> Variable:
        return _old_ir_op(op_type, {"X": x})
    return build


# paddle 3.3.1 builds these only as PIR or dygraph operations (paddle/base/dygraph/
# generated_tensor_methods_patch.py calls _C_ops, which refuses a legacy Variable), whether
# FLAGS_enable_pir_api=0 is set before import or the IR is switched in-process; the legacy IR still has
# the operators, so while tracing for it they are built as such
_OLD_IR_BUILDERS = {"matmul": _matmul, "gelu": _gelu, "sum": _sum,
                    **{name: _unary(name) for name in ("cos", "sin", "rsqrt", "sigmoid")}}


@contextlib.contextmanager
def _old_ir_builders() -> Iterator[None]:
    """paddle.<op>, paddle.nn.functional.<op> and Variable.<op> build legacy operators, for the block."""
    replaced = [(holder, name, getattr(holder, name)) for name in _OLD_IR_BUILDERS
                for holder in (paddle, paddle.tensor, paddle.nn.functional, Variable) if hasattr(holder, name)]
    try:
        for holder, name, _ in replaced:
            setattr(holder, name, _OLD_IR_BUILDERS[name])
        yield
    finally:
        for holder, name, original in replaced:
            setattr(holder, name, original)


def _dtype_name(dtype: object) -> str:
    name = paddle.base.data_feeder.convert_dtype(dtype)
    return "bfloat16" if name == "uint16" else name  # Paddle names bfloat16 after its storage


# ---------------------------------------------------------------------------------------------------
# Parameters


class _ParamsFile:
    """A `.pdiparams` being written: every header at once, in Paddle's (name) order, then the tensors'
    data in any order, so the checkpoint is read front to back."""

    def __init__(self, path: Path, params: list[_Param]) -> None:
        self.params = {param.name: param for param in params}
        self.offsets: dict[str, int] = {}
        offset = 0
        with open(path, "wb") as file:
            for param in params:
                header = param.header()
                file.seek(offset)
                file.write(header)
                self.offsets[param.name] = offset + len(header)
                offset += len(header) + param.nbytes
            file.truncate(offset)
        self._fd = os.open(path, os.O_WRONLY)

    def write(self, name: str, array: np.ndarray) -> None:
        param = self.params[name]
        if array.dtype != dtype_info(param.dtype).storage or tuple(array.shape) != param.shape:
            raise CheckFailed(f"{name}: {array.dtype}{list(array.shape)} where the program has "
                              f"{param.dtype}{list(param.shape)}")
        data = memoryview(np.ascontiguousarray(array).reshape(-1)).cast("B")
        offset = self.offsets[name]
        while data:
            written = os.pwrite(self._fd, data[:_WRITE_CHUNK], offset)
            data, offset = data[written:], offset + written

    def close(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)


def _stored_values(checkpoint: Checkpoint, step: Step, at_load: bool) -> np.ndarray:
    """One tensor as the network holds it: the plan's transpose (none for Paddle layouts), the one the family's
    Paddle loader makes as it reads the tensor (`at_load`: PaddleFormers' Linear weights) and the cast applied."""
    values = read_source(checkpoint, step)
    if step.transpose != at_load:
        values = transpose_last(values)
    return cast_float(values, step.source.dtype, step.target.dtype)


def _transposed_at_load(plan: Plan, layout: Layout, kinds: frozenset[str]) -> frozenset[str]:
    """The plan's target tensors (named in the network's layout) whose kind the family's Paddle loader transposes
    as it reads them (`[paddle] transpose_at_load`): the network holds them with their last two axes swapped."""
    if not kinds:
        return frozenset()
    rules = ((step.target.name, plan.keymap.rule_for(layout.to_official(step.target.name))) for step in plan.steps)
    return frozenset(name for name, rule in rules if rule is not None and rule.kind in kinds)


def _network_blocks(checkpoint: Checkpoint, step: Step, at_load: bool, axis: int, size: int) -> Iterator[np.ndarray]:
    """`_stored_values` of a 2-D tensor `size` entries along the network's `axis` at a time, read a block at a time
    (the output projection: never the whole table, nor a float32 copy of it)."""
    flipped = step.transpose != at_load
    for block in checkpoint.iter_blocks(step.source.name, size, axis=1 - axis if flipped else axis):
        yield cast_float(transpose_last(block) if flipped else block, step.source.dtype, step.target.dtype)


Blocks = dict[str, list[tuple["_ParamsFile", str, _Block]]]  # by network name: each head graph's file, variable, block


def _write_params(files: dict[_ParamsFile, dict[str, str]], blocks: Blocks, checkpoint: Checkpoint, plan: Plan,
                  buffers: dict[str, np.ndarray], transposed: frozenset[str]) -> None:
    """Fill the files (each with its variable name -> network name map) from the checkpoint, read front to
    back, each tensor once, and from the network's buffers (rotary tables, which no checkpoint holds); the head
    graphs' `blocks` of a tensor are read and written one block at a time."""
    wanted: dict[str, list[tuple[_ParamsFile, str]]] = {}
    for params_file, names in files.items():
        for var, network_name in names.items():
            wanted.setdefault(network_name, []).append((params_file, var))
    for step in ordered_steps(plan, checkpoint):
        targets = wanted.pop(step.target.name, [])
        values = _stored_values(checkpoint, step, step.target.name in transposed) if targets else None
        for params_file, var in targets:
            params_file.write(var, values)
        del values
        parts = sorted(blocks.pop(step.target.name, []), key=lambda part: part[2].start)
        if parts:
            first = parts[0][2]
            pieces = _network_blocks(checkpoint, step, step.target.name in transposed, first.axis,
                                     first.stop - first.start)
            for (params_file, var, _), piece in zip(parts, pieces, strict=True):
                params_file.write(var, piece)
    missing = [*blocks, *(name for name in wanted if name not in buffers)]
    if missing:
        raise CheckFailed(f"the checkpoint has no tensor for the network's {missing[0]}")
    for network_name, targets in wanted.items():
        for params_file, var in targets:
            params_file.write(var, buffers[network_name])


# ---------------------------------------------------------------------------------------------------
# Export


def export_static(weights_dir: Path, out_dir: Path, *, ir: str = "pir", dtype: str, max_seq_len: int,
                  on_step: Status | None = None, head_bytes: int = HEAD_BLOCK_BYTES) -> dict:
    """Write the vision graph and the text graph (prefill and decode steps) of the converted checkpoint at
    `weights_dir` to `out_dir/checkpoints`, which must not exist yet, with parameters stored in `dtype`. The caller
    stages `out_dir` (`vlhub convert --to paddle-inference` builds the whole layout in one staging directory); a
    failed export removes what it wrote.

    `max_seq_len` bounds prompt plus generated tokens (recorded for the predictor; Qwen-VL's cannot pass
    its seq_length, where the graph's rotary would need dynamic NTK). The output projection is split into graphs of
    at most `head_bytes` of parameters each. Returns what was written: family, ir, dtype, max_seq_len, the text
    graphs' file prefix, `graphs` (`vision`; `layers`, one per decoder layer; `head`, the output projection's
    blocks with the `vocab` range each computes: each one's model and params files, inputs with their shapes, -1
    for any size, and outputs), every file's sha256 and size (paths relative to `out_dir`), and the seconds taken.
    """
    if ir not in IRS:
        raise UserError(f"unknown ir {ir!r}; choose one of {', '.join(IRS)}")
    if dtype not in DTYPES:
        raise UserError(f"cannot store static-graph parameters as {dtype!r}; choose one of {', '.join(DTYPES)}")
    if max_seq_len < 1:
        raise UserError("max_seq_len must be at least 1")
    say = on_step or (lambda _message: None)
    started = time.monotonic()
    weights_dir, out_dir = Path(weights_dir), Path(out_dir)
    root = out_dir / CHECKPOINTS
    entry, bf16 = weights_entry(weights_dir)  # the file the family's Paddle loader reads (pdparams: uint16 is bf16)
    with open_checkpoint(entry, bf16=bf16) as checkpoint:
        family, network = family_network(weights_dir, checkpoint.config)
        if max_seq_len > network.position_limit:
            raise UserError(f"max_seq_len {max_seq_len} passes the model's {network.limit_name} "
                            f"{network.position_limit}, past which the graphs do not compute as the model does")
        # the network's parameters are named in the family's Paddle layout, some kinds transposed as they load
        layout, at_load = paddle_layout(family)
        plan = plan_conversion(checkpoint.tensors, checkpoint.config, target_layout=layout.name, dtype=dtype)
        transposed = _transposed_at_load(plan, layout, at_load)
        ensure_free_space(out_dir, sum(step.target.nbytes for step in plan.steps), "the static graphs")
        root.mkdir(parents=True)
        try:
            with _IR_GUARDS[ir]():
                graphs = _export(checkpoint, plan, transposed, family, network, root, ir, dtype, head_bytes, say)
            config = {**checkpoint.config, "infer_model_max_seq_len": max_seq_len, "infer_model_dtype": dtype,
                      "infer_model_head_blocks": len(graphs["head"]), "infer_model_paddle_commit": paddle.version.commit}
            write_json_atomic(root / "encode_text" / "config.json", config)
            say("hashing the files")
            files = _file_digests(root)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
    return {"family": family, "ir": ir, "dtype": dtype, "max_seq_len": max_seq_len, "prefix": graph_prefix(family),
            "graphs": graphs, "files": files, "seconds": round(time.monotonic() - started, 2)}


def _export(checkpoint: Checkpoint, plan: Plan, transposed: frozenset[str], family: str, network: PaddleFamily,
            root: Path, ir: str, dtype: str, head_bytes: int, say: Status) -> dict:
    """Every graph's program and parameters under `root`; what each graph is: `vision`, `layers` (one per decoder
    layer, in order) and `head` (the output projection's blocks, in vocabulary order)."""
    net, graphs = _lazy_graphs(network, family, dtype, head_bytes)
    state = net.to_static_state_dict()
    network_names = {tensor.name: name for name, tensor in state.items()}
    parameters = {name for name, _ in net.named_parameters()}
    buffers = {name: tensor.numpy() for name, tensor in state.items() if name not in parameters}
    shapes = {step.target.name: (step.target.dtype, swapped_shape(step.target.shape) if step.target.name in transposed
                                 else step.target.shape) for step in plan.steps}
    shapes |= {name: (logical_dtype(values.dtype), values.shape) for name, values in buffers.items()}
    files: dict[_ParamsFile, dict[str, str]] = {}
    blocks: Blocks = {}
    summary: dict = {"vision": None, "layers": [], "head": []}
    say(f"tracing {len(graphs)} graphs")
    # every parameters file opened so far is closed, also when a later graph fails or Ctrl-C comes while tracing
    try:
        for graph in graphs:
            prefix = root / graph.directory / graph.name
            prefix.parent.mkdir(exist_ok=True)
            params = _save_program(graph, prefix, ir)
            names = {param.name: network_names.get(param.name, "") for param in params}
            block = dict([graph.block]) if graph.block else {}
            for param in params:
                expected = shapes.get(names[param.name])
                if param.name in block:  # the block's part of the projection's network tensor
                    part = block[param.name]
                    names[param.name] = f"{network_names[part.name]}[{part.start}:{part.stop}]"
                    expected_dtype, whole = shapes.get(network_names[part.name], (None, ()))
                    expected = (expected_dtype, tuple(part.stop - part.start if axis == part.axis else extent
                                                      for axis, extent in enumerate(whole)))
                if expected != (param.dtype, param.shape):
                    raise CheckFailed(f"the {graph.name} graph's {param.name} ({names[param.name]}) is "
                                      f"{param.dtype}{list(param.shape)}; the checkpoint has {expected}")
            params_path = prefix.with_suffix(".pdiparams")
            params_file = _ParamsFile(params_path, params)
            files[params_file] = {name: names[name] for name in names if name not in block}
            for var, part in block.items():
                blocks.setdefault(network_names[part.name], []).append((params_file, var, part))
            if ir == "legacy":  # what jit.save records beside a legacy program
                info = {name: {"structured_name": structured, "stop_gradient": True}
                        for name, structured in names.items()}
                with open(prefix.with_suffix(".pdiparams.info"), "wb") as file:
                    pickle.dump(info, file, protocol=2)
            where = f"{CHECKPOINTS}/{graph.directory}"
            entry = {"model": f"{where}/{prefix.name}{'.pdmodel' if ir == 'legacy' else '.json'}",
                     "params": f"{where}/{params_path.name}",
                     "inputs": {spec.name: list(spec.shape) for spec in graph.inputs},  # -1: any size
                     "outputs": list(graph.outputs)}
            if graph.block:
                entry["vocab"] = [graph.block[1].start, graph.block[1].stop]
                summary["head"].append(entry)
            elif graph.directory == "encode_image":
                summary["vision"] = entry
            else:
                summary["layers"].append(entry)
        say("writing the parameters")
        _write_params(files, blocks, checkpoint, plan, buffers, transposed)
    finally:
        for params_file in files:
            params_file.close()
    return summary


def _file_digests(root: Path) -> dict[str, dict]:
    """sha256 and size of every file under `root` (the checkpoints directory), by path relative to
    out_dir."""
    return {f"{CHECKPOINTS}/{path.relative_to(root).as_posix()}": file_entry(path)
            for path in sorted(p for p in root.rglob("*") if p.is_file())}


# ---------------------------------------------------------------------------------------------------
# Running the graphs


class StaticPredictor:
    """The exported graphs chained by paddle.inference on CPU; tokens are embedded from the weights' table.

    Resident (the default), each graph's predictor is created when first used and kept, as a deployment with the
    memory for the whole model runs them. With `resident=False` each graph's predictor is created, run and released
    in turn, so memory holds one graph (a decoder layer, or a block of the output projection) at a time, whatever
    the model's size; `teacher_forced` then reads every graph once, `generate` once per token."""

    def __init__(self, checkpoints: Path, weights_dir: Path, *, threads: int | None = None,
                 fold_weights: bool = False, resident: bool = True) -> None:
        """Find the graphs under `checkpoints` (.json, else .pdmodel), to run on `threads` CPU threads (default: all).
        Weights stay in their stored dtype and are cast where used; `fold_weights` lets Paddle cast them all to
        float32 once at load instead (PIR graphs). Measured on Qwen2-VL-2B as one text graph (bfloat16, 2 CPU
        threads, paddle 3.3.1): peak RSS 6.0 GB, decode steps 2.8 s (legacy graphs: 6.0 GB, 1.1 s); folded, 12.8 GB
        and 0.26 s, as Paddle then holds a float32 copy of every weight."""
        checkpoints, weights_dir = Path(checkpoints), Path(weights_dir)
        config_path = checkpoints / "encode_text" / "config.json"
        if not config_path.is_file():
            raise UserError(f"no {config_path}: export the graphs first")
        config = json.loads(config_path.read_text())
        self.family, self.network = family_network(checkpoints, config)
        self.max_seq_len = int(config["infer_model_max_seq_len"])
        text, prefix = checkpoints / "encode_text", graph_prefix(self.family)
        self._vision = _model_files(checkpoints / "encode_image" / "vision")
        self._layers = [_model_files(text / f"{prefix}_layer_{index}") for index in range(self.network.layers)]
        self._heads = [_model_files(text / f"{prefix}_head_{number}")
                       for number in range(int(config.get("infer_model_head_blocks", 0)))]
        if not self._heads:
            raise UserError(f"{config_path} names no head graphs: export the graphs again with this vlhub")
        self._threads = threads or os.cpu_count() or 1
        self._fold_weights = fold_weights
        self._resident: dict[Path, paddle.inference.Predictor] | None = {} if resident else None
        entry, bf16 = weights_entry(weights_dir)
        self._checkpoint = open_checkpoint(entry, bf16=bf16)
        try:
            self._embedding = _embedding_name(self._checkpoint, self.family, self.network)
        except BaseException:
            self._checkpoint.close()
            raise

    def encode_images(self, pixel_values: np.ndarray, **vision_inputs: np.ndarray) -> np.ndarray:
        """Image embeddings [image tokens, hidden] (a DeepStack family's: [1 + features, image tokens, hidden]),
        from the inputs `PaddleForward.encode_images` takes (a mask the graph does not take, which no block reads,
        is left out)."""
        def run(predictor: paddle.inference.Predictor) -> np.ndarray:
            taken = set(predictor.get_input_names())
            inputs = {name: value for name, value in vision_inputs.items() if name in taken or name not in _MASKS}
            return _run(predictor, VISION_OUTPUTS, pixel_values=pixel_values, **inputs)[0]
        return self._with(self._vision, run)

    def generate(self, input_ids: np.ndarray, position_ids: np.ndarray, image_embeds: np.ndarray,
                 image_mask: np.ndarray, tokens: int,
                 positions_after: Callable[[int], np.ndarray]) -> tuple[np.ndarray, list[int]]:
        """Greedy decoding: the prompt's logits [L, vocab] (the graphs over empty caches) and `tokens` ids, each
        after the first from one decode step (the graphs over one token and the caches). `image_embeds` fill the
        positions `image_mask` marks, in order (DeepStack: `image_embeds[0]` does, and `image_embeds[1 + j]`,
        scattered to the same positions, is added to decoder layer j's output); `positions_after(n)` gives the
        positions of n tokens appended to the prompt, shaped like `position_ids`."""
        if tokens < 1:
            raise ValueError("tokens must be at least 1")
        embeds = self._prompt(input_ids, image_embeds, image_mask, len(input_ids) + tokens - 1)
        caches = [self._empty_cache()] * self.network.layers
        logits, caches = self.step(embeds, position_ids, caches, self._deepstack(image_embeds, image_mask))
        generated = [int(logits[-1].argmax())]
        for step in range(1, tokens):
            step_logits, caches = self.step(self._embed(np.array(generated[-1:])), positions_after(step)[..., -1:],
                                            caches, self._deepstack(None, np.zeros(1, bool)))
            generated.append(int(step_logits[-1].argmax()))
        return logits, generated

    def teacher_forced(self, input_ids: np.ndarray, position_ids: np.ndarray, image_embeds: np.ndarray,
                       image_mask: np.ndarray, reference_tokens: list[int],
                       positions_after: Callable[[int], np.ndarray]) -> tuple[np.ndarray, list[int]]:
        """The prompt's logits [L, vocab] and the graphs' choice after the prompt and after each of
        `reference_tokens` but the last: their own greedy tokens up to the first that differs. The inputs are as
        `generate` takes them. One graph at a time: each decoder layer's graph runs over the prompt (an empty cache),
        then over each following token as a decode step (one token and the cache so far), as `generate` runs them;
        then the head graphs over every position."""
        if not reference_tokens:
            raise ValueError("reference_tokens must not be empty")
        follow = [int(token) for token in reference_tokens[:-1]]
        prompt = self._prompt(input_ids, image_embeds, image_mask, len(input_ids) + len(follow))
        steps = [(prompt, position_ids, self._deepstack(image_embeds, image_mask))]
        steps += [(self._embed(np.array([token])), positions_after(number)[..., -1:],
                   self._deepstack(None, np.zeros(1, bool))) for number, token in enumerate(follow, 1)]
        hidden = [embeds for embeds, _, _ in steps]
        for index, graph in enumerate(self._layers):
            def run(predictor: paddle.inference.Predictor, index: int = index) -> None:
                cache = self._empty_cache()
                for number, (_, positions, deepstack) in enumerate(steps):
                    hidden[number], cache = _run(predictor, LAYER_OUTPUTS, **self._layer_inputs(
                        index, hidden[number], positions, cache, deepstack))
            self._with(graph, run)
        logits = self._logits(np.concatenate(hidden))
        length = len(input_ids)
        return logits[:length], [int(token) for token in logits[length - 1:].argmax(-1)]

    def step(self, embeds: np.ndarray, position_ids: np.ndarray, caches: list[np.ndarray],
             deepstack: dict[str, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One pass of the chain over L new tokens' embeddings [L, hidden] after each decoder layer's cache
        [2, kv_heads, T, head_dim]: every layer's graph in turn, then the head graphs; the logits [L, vocab] and
        the caches extended by the new tokens."""
        extended = []
        for index, graph in enumerate(self._layers):
            inputs = self._layer_inputs(index, embeds, position_ids, caches[index], deepstack)
            embeds, cache = self._with(graph, lambda predictor, inputs=inputs: _run(predictor, LAYER_OUTPUTS, **inputs))
            extended.append(cache)
        return self._logits(embeds), extended

    def _layer_inputs(self, index: int, hidden: np.ndarray, position_ids: np.ndarray, cache: np.ndarray,
                      deepstack: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = {"hidden_states": hidden, "position_ids": position_ids, "past_key_values": cache}
        if index < self.network.deepstack:
            inputs["deepstack_embeds"] = deepstack["deepstack_embeds"][index]
        return inputs

    def _logits(self, hidden: np.ndarray) -> np.ndarray:
        """The head graphs over the last layer's output [L, hidden], joined: [L, vocab]."""
        return np.concatenate([self._with(graph, lambda predictor: _run(predictor, HEAD_OUTPUTS,
                                                                         hidden_states=hidden)[0])
                               for graph in self._heads], axis=1)

    def _prompt(self, input_ids: np.ndarray, image_embeds: np.ndarray, image_mask: np.ndarray,
                positions: int) -> np.ndarray:
        """The prompt's embeddings [L, hidden] with the image's at the positions `image_mask` marks, after checking
        that `positions` in all fit the graphs' max_seq_len."""
        if positions > self.max_seq_len:
            raise UserError(f"{len(input_ids)} prompt tokens and {positions - len(input_ids) + 1} generated pass the "
                            f"graphs' max_seq_len {self.max_seq_len}")
        mask = np.asarray(image_mask, dtype=bool)
        network = self.network
        if mask.shape != input_ids.shape or image_embeds.shape != network.image_embeds_shape(int(mask.sum())):
            wanted = ", ".join("marked positions" if d == -1 else str(d) for d in network.image_embeds_shape(-1))
            raise ValueError(f"image_mask must be [{len(input_ids)}] and image_embeds [{wanted}], "
                             f"not {list(mask.shape)} and {list(image_embeds.shape)}")
        embeds = self._embed(input_ids)
        embeds[mask] = image_embeds[0] if image_embeds.ndim == 3 else image_embeds  # [1 + features, ...]: the first
        return embeds

    def _empty_cache(self) -> np.ndarray:
        return np.zeros(_cache_shape(self.network, 0), np.float32)

    def _deepstack(self, image_embeds: np.ndarray | None, mask: np.ndarray) -> dict[str, np.ndarray]:
        """The decoder layers' `deepstack_embeds` [features, L, hidden] for L tokens (none for a model without
        DeepStack): feature j at the positions `mask` marks, in order, zeros elsewhere (all zeros while decoding);
        layer j's graph takes row j."""
        features = self.network.deepstack
        if not features:
            return {}
        rows = np.zeros((features, len(mask), self.network.hidden), np.float32)
        if image_embeds is not None:
            rows[:, mask] = image_embeds[1:]
        return {"deepstack_embeds": rows}

    def _with(self, graph: tuple[Path, Path], work: Callable[[paddle.inference.Predictor], T]) -> T:
        """`work` done with the graph's predictor: the kept one (resident), else one created for it and released
        when it returns (this function holds the only reference)."""
        if self._resident is None:
            try:
                return work(_predictor(graph, self._threads, self._fold_weights))
            finally:
                _give_back_freed_memory()
        if graph not in self._resident:
            self._resident[graph] = _predictor(graph, self._threads, self._fold_weights)
        return work(self._resident[graph])

    def close(self) -> None:
        """Release the kept predictors and close the weights' open shard."""
        if self._resident:
            self._resident.clear()
        self._checkpoint.close()

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` of the embedding table as float32."""
        vocab = self._checkpoint.tensors[self._embedding].shape[0]
        if ids.ndim != 1 or not len(ids) or ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(f"token ids must be a non-empty 1-D array of values in [0, {vocab})")
        rows = self._checkpoint.read_rows(self._embedding, ids)
        return float32_values(rows, self._checkpoint.tensors[self._embedding].dtype)


def _embedding_name(checkpoint: Checkpoint, family: str, network: PaddleFamily) -> str:
    """The embedding table's name in the weights' layout, checked against the graphs' dims."""
    layout = detect_layout(family, checkpoint.tensors, checkpoint.config)
    name = next((n for n in embedding_candidates(family, layout) if n in checkpoint.tensors), None)
    if name is None or checkpoint.tensors[name].shape != (network.vocab, network.hidden):
        raise UserError(f"{checkpoint.root} holds no [{network.vocab}, {network.hidden}] embedding table for these "
                        "graphs")
    return name


def _give_back_freed_memory() -> None:
    """Hand the C heap's free pages back to the system. glibc serves blocks below its mmap threshold from its heap,
    and raises that threshold to the largest block freed, so a released predictor's weights would stay resident
    (measured on the 72B shape, paddle 3.3.1: 1.7 GB kept after the vision graph's predictor was released)."""
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its allocator returns memory its own way
        pass


def _model_files(prefix: Path) -> tuple[Path, Path]:
    """A graph's program (.json, else .pdmodel) and parameters."""
    model = next((path for path in (prefix.with_suffix(".json"), prefix.with_suffix(".pdmodel")) if path.is_file()),
                 None)
    if model is None:
        raise UserError(f"no {prefix.name}.json or {prefix.name}.pdmodel in {prefix.parent}: export the graphs first")
    return model, prefix.with_suffix(".pdiparams")


def _predictor(graph: tuple[Path, Path], threads: int, fold_weights: bool) -> paddle.inference.Predictor:
    model, params = graph
    config = paddle.inference.Config(str(model), str(params))
    config.disable_gpu()
    # measured with paddle 3.3.1 on Qwen2-VL-2B: under oneDNN, weights cast from bfloat16 gave NaN logits, and
    # oneDNN keeps a second, reordered copy of every float32 weight it multiplies by
    config.disable_onednn()
    if model.suffix == ".pdmodel":
        # the legacy executor otherwise keeps every operator's output, each weight's float32 cast included:
        # 15.0 GB instead of 6.0 GB on Qwen2-VL-2B
        config.enable_memory_optim()
    elif not fold_weights:
        config.delete_pass("constant_folding_pass")  # which would turn each cast weight into a float32 copy
    config.set_cpu_math_library_num_threads(threads)
    config.disable_glog_info()
    return paddle.inference.create_predictor(config)


def _run(predictor: paddle.inference.Predictor, outputs: tuple[str, ...], **inputs: np.ndarray) -> list[np.ndarray]:
    """Feed `inputs` by name, run, and copy out `outputs`."""
    expected = predictor.get_input_names()
    if sorted(inputs) != sorted(expected):
        raise ValueError(f"the graph takes {', '.join(expected)}; given {', '.join(inputs)}")
    for name, value in inputs.items():
        handle = predictor.get_input_handle(name)
        handle.reshape(value.shape)
        handle.copy_from_cpu(np.ascontiguousarray(value, dtype=np.int64 if name in _INT_INPUTS else np.float32))
    predictor.run()
    return [predictor.get_output_handle(name).copy_to_cpu() for name in outputs]
