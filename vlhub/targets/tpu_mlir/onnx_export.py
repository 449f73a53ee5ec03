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

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from vlhub.atomic import ensure_free_space
from vlhub.deploy.onnx_graph import (
    F32,
    I32,
    I64,
    Graph,
    Progress,
    Store,
    Writer,
    attention,
    linear,
    rms_norm,
    rotary,
    silu,
    vision_tower,
    vision_width,
)
from vlhub.errors import UserError
from vlhub.family_registry import FAMILIES
from vlhub.formats.writers import file_entry
from vlhub.keymaps.config import text_config, tie_word_embeddings
from vlhub.sizes import config_family
from vlhub.smoke.reference import inverse_frequencies, rotary_tables
from vlhub.smoke.weights import ModelWeights
from vlhub.targets.tpu_mlir import NAME

TOP_K = 50
MIN_TOKENS_TO_KEEP = 5
FILTERED_LOGIT = -1000.0  # what the sample head gives tokens top-p drops (LLM-TPU's PenaltySampleHead)
MODELS = "models"  # the directory under out that is written
LLM_DIR = "models/onnx/llm"
VIT_DIR = "models/onnx/vit"
VIT = "vit"  # the ViT network's name
VIT_STEM = "vision_transformer"  # its file's name


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
        writer = Writer(weights, shapes, out, on_bytes or (lambda _size: None))
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


def _write_text(writer: Writer, dims: TextDims, seq: int, tied: bool) -> None:
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
# The text networks


def _block(store: Store, dims: TextDims, layer: int, seq: int, rope: _Rope, cache: bool) -> Graph:
    """block_{layer} (the prompt, S tokens) or block_cache_{layer} (one token after an S-slot history)."""
    g = Graph(f"block_cache_{layer}" if cache else f"block_{layer}", store)
    length, keys = (1, seq + 1) if cache else (seq, seq)
    kv = [1, length, dims.kv_heads, dims.head_dim]
    x = g.input("input_states", F32, [1, length, dims.hidden])
    positions = g.input("position_ids", I64, [3, 1, length])
    mask = g.input("attention_mask", F32, [1, 1, length, keys])
    history = [g.input(name, F32, [1, seq, dims.kv_heads, dims.head_dim])
               for name in (("history_k", "history_v") if cache else ())]
    cos, sin = (_mrope(g, table, rope.selector, positions) for table in (rope.cos, rope.sin))
    p = f"model.layers.{layer}."
    h = rms_norm(g, x, p + "input_layernorm.weight", dims.eps)
    q, k = (g.op("Reshape", linear(g, h, f"{p}self_attn.{n}_proj"), g.const([1, length, heads, dims.head_dim]))
            for n, heads in (("q", dims.heads), ("k", dims.kv_heads)))
    v = g.op("Reshape", linear(g, h, p + "self_attn.v_proj"), g.const(kv), out="past_v")
    q = rotary(g, q, cos, sin, dims.head_dim)
    k = rotary(g, k, cos, sin, dims.head_dim, out="past_k")
    if history:
        k, v = (g.op("Concat", old, new, axis=1) for old, new in zip(history, (k, v)))
    k, v = (_heads_major(g, t, dims) for t in (k, v))
    attended = attention(g, g.op("Transpose", q, perm=[0, 2, 1, 3]), k, v, mask, dims.head_dim)
    attended = g.op("Reshape", g.op("Transpose", attended, perm=[0, 2, 1, 3]), g.const([1, length, dims.hidden]))
    x = g.op("Add", x, linear(g, attended, p + "self_attn.o_proj"))
    h = rms_norm(g, x, p + "post_attention_layernorm.weight", dims.eps)
    act = g.op("Mul", silu(g, linear(g, h, p + "mlp.gate_proj")), linear(g, h, p + "mlp.up_proj"))
    g.op("Add", x, linear(g, act, p + "mlp.down_proj"), out="hidden_states")
    g.output("hidden_states", F32, [1, length, dims.hidden])
    g.output("past_k", F32, kv)
    g.output("past_v", F32, kv)
    return g


def _mrope(g: Graph, table: np.ndarray, selector: np.ndarray, positions: str) -> str:
    """The table's rows for the t, h and w positions, each column from its section's row: [1, L, 1, D]."""
    rows = g.op("Gather", g.const(table), positions, axis=0)  # [3, 1, L, D]
    mixed = g.op("ReduceSum", g.op("Mul", rows, g.const(selector)), g.const([0]), keepdims=0)
    return g.op("Unsqueeze", mixed, g.const([2]))


def _heads_major(g: Graph, t: str, dims: TextDims) -> str:
    """Sequence-major [1, T, KV, D] keys or values as [1, heads, T, D], each KV head serving heads/KV queries."""
    t = g.op("Transpose", t, perm=[0, 2, 1, 3])
    group = dims.heads // dims.kv_heads
    if group == 1:
        return t
    t = g.op("Expand", g.op("Unsqueeze", t, g.const([2])), g.const([1, 1, group, 1, 1]))
    return g.op("Reshape", t, g.const([1, dims.heads, -1, dims.head_dim]))


def _embedding(store: Store, name: str, length: int, dims: TextDims) -> Graph:
    g = Graph(name, store)
    ids = g.input("input_ids", I32, [1, length])
    g.op("Gather", g.weight("model.embed_tokens.weight"), ids, axis=0, out="hidden_states")
    g.output("hidden_states", F32, [1, length, dims.hidden])
    return g


def _lm_head(store: Store, dims: TextDims, head: str) -> Graph:
    g = Graph("lm_head", store)
    x = g.input("hidden_states", F32, [1, dims.hidden])
    h = rms_norm(g, x, "model.norm.weight", dims.eps)
    g.op("Gemm", h, g.weight(head), transB=1, out="m_logits")  # [V, H] as stored: streamed, never transposed
    g.output("m_logits", F32, [1, dims.vocab])
    return g


def _greedy_head(vocab: int) -> Graph:
    g = Graph("greedy_head")
    g.op("ArgMax", g.input("m_logits", F32, [1, vocab]), axis=1, keepdims=1, out="token")
    g.output("token", I64, [1, 1])
    return g


def _penalty_sample_head(vocab: int, seq: int) -> Graph:
    """LLM-TPU's PenaltySampleHead: logits of the ids in `input_ids` divided by `penalty` (multiplied where
    negative), the top 50, divided by `temperature`, softmax; tokens past cumulative `top_p` get -1000 (the
    first 5 always stay); softmax again. The caller samples a token from `probs` over `token`."""
    g = Graph("penalty_sample_head")
    logits = g.input("m_logits", F32, [1, vocab])
    ids = g.input("input_ids", I64, [1, seq])
    top_p, temperature, penalty = (g.input(n, F32, [1]) for n in ("top_p", "temperature", "penalty"))
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
    g.output("probs", F32, [1, TOP_K])
    g.output("token", I64, [1, TOP_K])
    return g


# ---------------------------------------------------------------------------------------------------
# The vision network


def _vision_transformer(store: Store, config: dict, patches: int) -> Graph:
    """The ViT network in llm_convert's form over P padded patch rows (see the module doc for its inputs)."""
    cfg = config["vision_config"]
    # window attention comes with llm_convert's names and forms of the masks (TPU-MLIR python/llm/Qwen2_5VLConverter.py)
    windows = config_family(config).vision.window_attention
    width, heads = vision_width(config)
    dim = width // heads
    unit = cfg.get("spatial_merge_size", 2) ** 2
    patch_values = math.prod(store.shapes["visual.patch_embed.proj.weight"][1:])
    g = Graph(VIT, store)
    pixels = g.input("input_states", F32, [patches, patch_values])
    positions = g.input("position_ids", I32, [patches, 2])
    mask_shape = [1, 1, patches, patches] if windows else [1, patches, patches]
    full = window = g.input("full_attn_mask" if windows else "attention_mask", F32, mask_shape)
    if windows:
        window = g.input("window_attn_mask", F32, mask_shape)
        reverse = g.input("reverse_index", I32, [patches // unit])
    # rows and columns are below P; each gathers D/4 angles, and (row, column) repeated makes the D-wide table
    angles = np.arange(patches, dtype=np.float32)[:, None] * inverse_frequencies(dim // 2, 10000.0)
    tables = []
    for function in (np.cos, np.sin):
        half = g.op("Reshape", g.op("Gather", g.const(function(angles)), positions, axis=0),
                    g.const([patches, dim // 2]))
        tables.append(g.op("Concat", half, half, axis=-1))
    cos, sin = tables
    merged = vision_tower(g, config, patches, pixels, cos, sin, full, window,
                          out=None if windows else "hidden_states")
    if windows:  # the merged tokens back in image order
        g.op("Gather", merged, reverse, axis=0, out="hidden_states")
    g.output("hidden_states", F32, [patches // unit, store.shapes["visual.merger.mlp.2.weight"][0]])
    return g
