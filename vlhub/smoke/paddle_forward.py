"""The three families as paddle.nn networks (dygraph) over converted Paddle weights.

The networks mirror PaddleMIX's parameter names. A checkpoint in another Paddle layout its family's key
map declares (Qwen-VL's `paddle-inference`: `qwen.h.N.*`, `qwen.wte`, `qwen.ln_f`) is read through the
key map, each network name spelt in the checkpoint's layout; checks report the checkpoint's own names.
Resident, the whole network is built and loaded as Paddle users load it (`paddle.load` of each shard,
its keys renamed to the network's, `set_state_dict`); streamed, the same layer classes are built one
block at a time and filled from vlhub's lazy reader, so memory holds one block's weights, never the
model. Weights of any float dtype (bfloat16, float16, float32) are cast to float32 as they load. Everything
computes in float32. The forwards take masks and index orders as tensors and branch only on
configuration, so the resident networks can go through `paddle.jit.to_static`. Parameters may be
created narrower than float32 (a static export keeps the checkpoint's dtype); they are cast to float32
where they are used.
Facts: shared/docs/qwen_keys.md 1.2-1.5, 3.2, 4.3; paddle.md 1.1, 2.1, 4.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from vlhub.convert.configs import official_config
from vlhub.convert.layouts import UNKNOWN, detect_layout
from vlhub.errors import CheckFailed, UserError
from vlhub.families import family_of_config
from vlhub.formats.readers import Checkpoint, open_checkpoint
from vlhub.formats.tensors import float32_values
from vlhub.keymaps import load_keymap
from vlhub.keymaps.config import tie_word_embeddings

MASKED = -1e30  # additive mask value: finite, so a fully masked row gives no NaN
HEAD_BLOCK = 4096  # lm_head columns (or tied embedding rows) per block in streamed mode
NETWORK_LAYOUT = "paddlemix"  # the key-map layout whose names the networks' parameters have
_SHOWN_KEYS = 8


# ---------------------------------------------------------------------------------------------------
# Shared pieces


def _f32(value: paddle.Tensor | None) -> paddle.Tensor | None:
    """A parameter as float32, whatever dtype it is stored in (None stays None)."""
    return value if value is None or value.dtype == paddle.float32 else value.astype("float32")


class RMSNorm(nn.Layer):
    """Weight-only RMS normalisation."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = self.create_parameter([width], default_initializer=nn.initializer.Constant(1.0))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return x * paddle.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * _f32(self.weight)


class Linear(nn.Linear):
    """nn.Linear computing in float32 over weights of any float dtype."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return F.linear(x, _f32(self.weight), _f32(self.bias))


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm computing in float32 over weights of any float dtype."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return F.layer_norm(x, self._normalized_shape, _f32(self.weight), _f32(self.bias), self._epsilon)


def _linear(width_in: int, width_out: int, *, bias: bool = True) -> Linear:
    return Linear(width_in, width_out, bias_attr=None if bias else False)


def _rotate(x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor) -> paddle.Tensor:
    """Rotary embedding, rotate-half convention: x*cos + rotate_half(x)*sin."""
    first, second = paddle.split(x, 2, axis=-1)
    return x * cos + paddle.concat([-second, first], axis=-1) * sin


def _attention(q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor, mask: paddle.Tensor | None) -> paddle.Tensor:
    """Softmax attention over [..., heads, seq, head_dim], scaled by 1/sqrt(head_dim), plus an additive mask."""
    scores = paddle.matmul(q, k, transpose_y=True) * (q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores + mask
    return paddle.matmul(F.softmax(scores, axis=-1), v)


Cache = tuple[paddle.Tensor, paddle.Tensor]  # one layer's keys (rotated) and values, [kv_heads, T, head_dim]


def _extend(past: Cache | None, k: paddle.Tensor, v: paddle.Tensor) -> Cache:
    """The cached keys and values followed by the new ones, along the sequence axis."""
    if past is None:
        return k, v
    return paddle.concat([past[0], k], axis=1), paddle.concat([past[1], v], axis=1)


def _causal_mask(h: paddle.Tensor) -> paddle.Tensor:
    positions = paddle.arange(paddle.shape(h)[0])
    return (positions.unsqueeze(0) > positions.unsqueeze(1)).astype("float32") * MASKED


def _merge_image_embeds(h: paddle.Tensor, image_embeds: paddle.Tensor, image_mask: paddle.Tensor) -> paddle.Tensor:
    """Replace the hidden states where `image_mask` is set by the rows of `image_embeds`, in order."""
    marks = image_mask.astype("int64")
    # row 0 is a placeholder the unmarked positions gather, so no image at all needs no branch
    table = paddle.concat([paddle.zeros([1, h.shape[-1]], "float32"), image_embeds])
    chosen = image_mask.astype("float32").unsqueeze(-1)
    # selecting by arithmetic is exact for finite values, and paddle.where warns when traced for export
    return h * (1 - chosen) + paddle.gather(table, paddle.cumsum(marks) * marks) * chosen


def _inv_freq(dim: int, base: float) -> paddle.Tensor:
    return paddle.to_tensor(1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))


class GatedMLP(nn.Layer):
    """down(silu(gate(x)) * up(x)): the Qwen2 text MLP (no biases) and the Qwen2.5-VL vision MLP."""

    def __init__(self, width: int, inner: int, *, bias: bool) -> None:
        super().__init__()
        self.gate_proj = _linear(width, inner, bias=bias)
        self.up_proj = _linear(width, inner, bias=bias)
        self.down_proj = _linear(inner, width, bias=bias)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ---------------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL


@dataclass(frozen=True)
class Qwen2Dims:
    """What the Qwen2(.5)-VL networks need from config.json (flat or transformers-5 nested)."""

    qwen2_5: bool
    v_width: int
    v_heads: int
    v_inner: int
    v_depth: int
    v_out: int
    in_chans: int
    patch: int
    temporal_patch: int
    merge: int
    fullatt_blocks: tuple[int, ...]
    hidden: int
    inner: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int
    eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    tied: bool

    @classmethod
    def from_config(cls, config: dict) -> Qwen2Dims:
        flat = official_config(config)
        vision = flat.get("vision_config") or {}
        qwen2_5 = flat["model_type"] == "qwen2_5_vl"
        hidden = flat["hidden_size"]
        if qwen2_5:  # the vision names changed roles between the families (qwen_keys.md 1.3, 1.4)
            v_width = vision.get("hidden_size", 1280)
            v_inner = vision.get("intermediate_size", 3420)
            v_out = vision.get("out_hidden_size", hidden)
        else:
            v_width = vision.get("embed_dim", 1280)
            v_inner = int(v_width * vision.get("mlp_ratio", 4))
            v_out = vision.get("hidden_size", hidden)
        heads = flat["num_attention_heads"]
        dims = cls(
            qwen2_5=qwen2_5, v_width=v_width, v_heads=vision.get("num_heads", 16), v_inner=v_inner,
            v_depth=vision.get("depth", 32), v_out=v_out, in_chans=vision.get("in_chans", vision.get("in_channels", 3)),
            patch=vision.get("patch_size", 14), temporal_patch=vision.get("temporal_patch_size", 2),
            merge=vision.get("spatial_merge_size", 2),
            fullatt_blocks=tuple(vision.get("fullatt_block_indexes", (7, 15, 23, 31))) if qwen2_5 else (),
            hidden=hidden, inner=flat["intermediate_size"], heads=heads,
            kv_heads=flat.get("num_key_value_heads", heads), layers=flat["num_hidden_layers"],
            vocab=flat["vocab_size"], eps=flat.get("rms_norm_eps", 1e-6), rope_theta=flat.get("rope_theta", 1e6),
            mrope_section=tuple((flat.get("rope_scaling") or {}).get("mrope_section", (16, 24, 24))),
            tied=tie_word_embeddings(flat),
        )
        if sum(dims.mrope_section) * 2 != hidden // heads:
            raise UserError(f"mrope_section {list(dims.mrope_section)} does not cover head_dim {hidden // heads} / 2")
        return dims


class PatchEmbed(nn.Layer):
    """Conv3D over (C, T, P, P) patches: each patch row of pixel_values becomes one E-wide vector."""

    def __init__(self, dims: Qwen2Dims) -> None:
        super().__init__()
        self.shape = [-1, dims.in_chans, dims.temporal_patch, dims.patch, dims.patch]
        self.kernel = [dims.temporal_patch, dims.patch, dims.patch]
        self.proj = nn.Conv3D(dims.in_chans, dims.v_width, self.kernel, stride=self.kernel, bias_attr=False)

    def forward(self, pixel_values: paddle.Tensor) -> paddle.Tensor:
        patches = F.conv3d(pixel_values.reshape(self.shape), _f32(self.proj.weight), stride=self.kernel)
        return patches.reshape([-1, self.proj.weight.shape[0]])


class VisionRotary(nn.Layer):
    """2-D rotary angles from (row, col) patch positions: [h freqs, w freqs] twice over head_dim."""

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.half = head_dim // 2
        self.register_buffer("inv_freq", _inv_freq(self.half, theta), persistable=False)

    def forward(self, positions: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        freqs = (positions.astype("float32").unsqueeze(-1) * self.inv_freq).reshape([-1, self.half])
        emb = paddle.concat([freqs, freqs], axis=-1)
        return paddle.cos(emb), paddle.sin(emb)


class VisionAttention(nn.Layer):
    """Fused qkv (output columns [all q; all k; all v]) with 2-D rotary, masked by segment."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.width, self.heads = width, heads
        self.qkv = _linear(width, 3 * width)
        self.proj = _linear(width, width)

    def forward(self, x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor, mask: paddle.Tensor) -> paddle.Tensor:
        qkv = self.qkv(x).reshape([-1, 3, self.heads, self.width // self.heads]).transpose([1, 2, 0, 3])
        q, k, v = qkv.unbind(0)
        out = _attention(_rotate(q, cos, sin), _rotate(k, cos, sin), v, mask)
        return self.proj(out.transpose([1, 0, 2]).reshape([-1, self.width]))


class QuickGeluMLP(nn.Layer):
    """fc2(quick_gelu(fc1(x))): the Qwen2-VL vision MLP."""

    def __init__(self, width: int, inner: int) -> None:
        super().__init__()
        self.fc1 = _linear(width, inner)
        self.fc2 = _linear(inner, width)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.fc1(x)
        return self.fc2(x * F.sigmoid(1.702 * x))


class VisionBlock(nn.Layer):
    """One Qwen2(.5)-VL vision block: pre-norm attention and MLP, each added back."""

    def __init__(self, dims: Qwen2Dims) -> None:
        super().__init__()
        if dims.qwen2_5:
            self.norm1, self.norm2 = RMSNorm(dims.v_width, 1e-6), RMSNorm(dims.v_width, 1e-6)
            self.mlp = GatedMLP(dims.v_width, dims.v_inner, bias=True)
        else:
            self.norm1, self.norm2 = LayerNorm(dims.v_width, 1e-6), LayerNorm(dims.v_width, 1e-6)
            self.mlp = QuickGeluMLP(dims.v_width, dims.v_inner)
        self.attn = VisionAttention(dims.v_width, dims.v_heads)

    def forward(self, x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor, mask: paddle.Tensor) -> paddle.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Layer):
    """ln_q per patch, then each merge group of patches as one row through Linear, GELU, Linear."""

    def __init__(self, dims: Qwen2Dims) -> None:
        super().__init__()
        self.merged = dims.v_width * dims.merge**2
        self.ln_q = RMSNorm(dims.v_width, 1e-6) if dims.qwen2_5 else LayerNorm(dims.v_width, 1e-6)
        self.mlp = nn.Sequential(_linear(self.merged, self.merged), nn.GELU(), _linear(self.merged, dims.v_out))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.mlp(self.ln_q(x).reshape([-1, self.merged]))


def _by_group(x: paddle.Tensor, index: paddle.Tensor, group: int) -> paddle.Tensor:
    """Rows of `x` reordered by merge group (`group` consecutive rows each) in `index` order."""
    width = x.shape[-1]
    return paddle.gather(x.reshape([-1, group, width]), index).reshape([-1, width])


class VisionTower(nn.Layer):
    """`visual`: patch embedding, `depth` blocks (0 when streamed: they are run one at a time), merger."""

    def __init__(self, dims: Qwen2Dims, depth: int) -> None:
        super().__init__()
        self.group = dims.merge**2
        self.fullatt_blocks = dims.fullatt_blocks
        self.patch_embed = PatchEmbed(dims)
        self.rotary = VisionRotary(dims.v_width // dims.v_heads)
        self.blocks = nn.LayerList([VisionBlock(dims) for _ in range(depth)])
        self.merger = PatchMerger(dims)

    def embed(self, pixel_values: paddle.Tensor, positions: paddle.Tensor,
              window_index: paddle.Tensor | None) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
        """Patch vectors and their rotary cos/sin, in window order when a window index is given."""
        x = self.patch_embed(pixel_values)
        cos, sin = self.rotary(positions)
        if window_index is not None:
            x, cos, sin = (_by_group(t, window_index, self.group) for t in (x, cos, sin))
        return x, cos, sin

    def block_mask(self, block: int, full_mask: paddle.Tensor, window_mask: paddle.Tensor | None) -> paddle.Tensor:
        return full_mask if window_mask is None or block in self.fullatt_blocks else window_mask

    def merge(self, x: paddle.Tensor, reverse_index: paddle.Tensor | None) -> paddle.Tensor:
        x = self.merger(x)
        return x if reverse_index is None else paddle.gather(x, reverse_index)

    def forward(self, pixel_values: paddle.Tensor, vision_position_ids: paddle.Tensor, full_mask: paddle.Tensor,
                window_index: paddle.Tensor | None = None, reverse_index: paddle.Tensor | None = None,
                window_mask: paddle.Tensor | None = None) -> paddle.Tensor:
        x, cos, sin = self.embed(pixel_values, vision_position_ids, window_index)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, self.block_mask(i, full_mask, window_mask))
        return self.merge(x, reverse_index)


class MRope(nn.Layer):
    """Text M-RoPE angles from [3, L] positions: frequency slot chunks take rows t, h, w in turn."""

    def __init__(self, head_dim: int, theta: float, section: Iterable[int]) -> None:
        super().__init__()
        self.register_buffer("inv_freq", _inv_freq(head_dim, theta), persistable=False)
        rows = np.concatenate([np.full(n, i % 3) for i, n in enumerate(section)])
        # a one-hot [3, 1, d/2] selector: picking by multiply-and-sum is exact and needs no gather
        self.register_buffer("select", paddle.to_tensor((rows == np.arange(3)[:, None, None]).astype(np.float32)),
                             persistable=False)

    def forward(self, position_ids: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        freqs = (position_ids.astype("float32").unsqueeze(-1) * self.inv_freq * self.select).sum(0)
        emb = paddle.concat([freqs, freqs], axis=-1)
        return paddle.cos(emb), paddle.sin(emb)


class Qwen2Attention(nn.Layer):
    """q/k/v projections with biases, rotary, grouped-query causal attention, o_proj without bias."""

    def __init__(self, dims: Qwen2Dims) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = dims.heads, dims.kv_heads, dims.hidden // dims.heads
        self.q_proj = _linear(dims.hidden, dims.heads * self.head_dim)
        self.k_proj = _linear(dims.hidden, dims.kv_heads * self.head_dim)
        self.v_proj = _linear(dims.hidden, dims.kv_heads * self.head_dim)
        self.o_proj = _linear(dims.heads * self.head_dim, dims.hidden, bias=False)

    def forward(self, x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor, mask: paddle.Tensor | None,
                past: Cache | None = None) -> tuple[paddle.Tensor, Cache]:
        """The output for new tokens `x` after the `past` keys and values, and those extended by x's."""
        q = self.q_proj(x).reshape([-1, self.heads, self.head_dim]).transpose([1, 0, 2])
        k, v = (proj(x).reshape([-1, self.kv_heads, self.head_dim]).transpose([1, 0, 2])
                for proj in (self.k_proj, self.v_proj))
        k, v = _extend(past, _rotate(k, cos, sin), v)
        repeat = self.heads // self.kv_heads
        out = _attention(_rotate(q, cos, sin), paddle.repeat_interleave(k, repeat, axis=0),
                         paddle.repeat_interleave(v, repeat, axis=0), mask)
        return self.o_proj(out.transpose([1, 0, 2]).reshape([-1, self.heads * self.head_dim])), (k, v)


class PreNormLayer(nn.Layer):
    """A decoder layer: x + attention(norm(x)), then + mlp(norm(x)). Subclasses own the four parts under their
    PaddleMIX names and return them from `parts`."""

    def parts(self) -> tuple[nn.Layer, nn.Layer, nn.Layer, nn.Layer]:
        """The attention's norm, the attention, the MLP's norm, the MLP."""
        raise NotImplementedError

    def forward(self, x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor, mask: paddle.Tensor) -> paddle.Tensor:
        return self.step(x, cos, sin, mask)[0]

    def step(self, x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor, mask: paddle.Tensor | None,
             past: Cache | None = None) -> tuple[paddle.Tensor, Cache]:
        """The layer's output for new tokens `x` after `past`, and its keys and values extended by x's."""
        attention_norm, attention, mlp_norm, mlp = self.parts()
        out, cache = attention(attention_norm(x), cos, sin, mask, past)
        x = x + out
        return x + mlp(mlp_norm(x)), cache


class TextModel(nn.Layer):
    """A language model: embedding (resident only), decoder layers, final norm. Subclasses name the children as
    PaddleMIX does: `embedding_key` (the table's parameter), `layers_key`, and `final_norm`."""

    embedding_key: str
    layers_key: str
    rotary: nn.Layer

    def final_norm(self, h: paddle.Tensor) -> paddle.Tensor:
        raise NotImplementedError

    def prepare(self, h: paddle.Tensor, position_ids: paddle.Tensor, image_embeds: paddle.Tensor,
                image_mask: paddle.Tensor) -> tuple[paddle.Tensor, ...]:
        """The first layer's input, rotary cos/sin and causal mask, from the token embeddings `h`."""
        cos, sin = self.rotary(position_ids)
        return _merge_image_embeds(h, image_embeds, image_mask), cos, sin, _causal_mask(h)

    def forward(self, input_ids: paddle.Tensor, position_ids: paddle.Tensor, image_embeds: paddle.Tensor,
                image_mask: paddle.Tensor) -> paddle.Tensor:
        embedding = getattr(self, self.embedding_key.removesuffix(".weight"))
        h, cos, sin, mask = self.prepare(embedding(input_ids), position_ids, image_embeds, image_mask)
        for layer in getattr(self, self.layers_key):
            h = layer(h, cos, sin, mask)
        return self.final_norm(h)


class Qwen2DecoderLayer(PreNormLayer):
    """One Qwen2 decoder layer."""

    def __init__(self, dims: Qwen2Dims) -> None:
        super().__init__()
        self.self_attn = Qwen2Attention(dims)
        self.mlp = GatedMLP(dims.hidden, dims.inner, bias=False)
        self.input_layernorm = RMSNorm(dims.hidden, dims.eps)
        self.post_attention_layernorm = RMSNorm(dims.hidden, dims.eps)

    def parts(self) -> tuple[nn.Layer, nn.Layer, nn.Layer, nn.Layer]:
        return self.input_layernorm, self.self_attn, self.post_attention_layernorm, self.mlp


class Qwen2TextModel(TextModel):
    """`model`: token embedding (resident only), decoder layers, final norm."""

    embedding_key, layers_key, layer_class = "embed_tokens.weight", "layers", Qwen2DecoderLayer

    def __init__(self, dims: Qwen2Dims, layers: int, *, embedding: bool) -> None:
        super().__init__()
        if embedding:
            self.embed_tokens = nn.Embedding(dims.vocab, dims.hidden)
        self.layers = nn.LayerList([Qwen2DecoderLayer(dims) for _ in range(layers)])
        self.norm = RMSNorm(dims.hidden, dims.eps)
        self.rotary = MRope(dims.hidden // dims.heads, dims.rope_theta, dims.mrope_section)

    def final_norm(self, h: paddle.Tensor) -> paddle.Tensor:
        return self.norm(h)


class Qwen2VLNet(nn.Layer):
    """Qwen2-VL / Qwen2.5-VL with PaddleMIX's children `visual`, `model` and (untied) `lm_head`."""

    def __init__(self, dims: Qwen2Dims) -> None:
        super().__init__()
        self.tied = dims.tied
        self.visual = VisionTower(dims, dims.v_depth)
        self.model = Qwen2TextModel(dims, dims.layers, embedding=True)
        if not dims.tied:
            self.lm_head = _linear(dims.hidden, dims.vocab, bias=False)

    def forward(self, input_ids: paddle.Tensor, position_ids: paddle.Tensor, image_embeds: paddle.Tensor,
                image_mask: paddle.Tensor) -> paddle.Tensor:
        h = self.model(input_ids, position_ids, image_embeds, image_mask)
        if self.tied:
            return paddle.matmul(h, self.model.embed_tokens.weight, transpose_y=True)
        return self.lm_head(h)


# ---------------------------------------------------------------------------------------------------
# Qwen-VL


@dataclass(frozen=True)
class QwenVLDims:
    """What the Qwen-VL networks need from config.json."""

    hidden: int
    heads: int
    layers: int
    mlp: int
    vocab: int
    eps: float
    rope_base: float
    seq_length: int
    v_width: int
    v_heads: int
    v_layers: int
    v_mlp: int
    patch: int
    image_size: int
    out: int

    @classmethod
    def from_config(cls, config: dict) -> QwenVLDims:
        visual = config["visual"]
        head_dim = config["hidden_size"] // config["num_attention_heads"]
        if config.get("rotary_pct", 1.0) != 1.0 or config.get("kv_channels", head_dim) != head_dim:
            raise UserError("the forward rotates whole heads: it needs rotary_pct 1.0 and kv_channels = hidden_size / "
                            "num_attention_heads, as every released Qwen-VL has")
        return cls(
            hidden=config["hidden_size"], heads=config["num_attention_heads"], layers=config["num_hidden_layers"],
            mlp=config["intermediate_size"] // 2, vocab=config["vocab_size"],
            eps=config.get("layer_norm_epsilon", 1e-6), rope_base=config.get("rotary_emb_base", 10000),
            seq_length=config.get("seq_length", 2048), v_width=visual["width"], v_heads=visual["heads"],
            v_layers=visual["layers"], v_mlp=int(visual["width"] * visual["mlp_ratio"]),
            patch=visual["patch_size"], image_size=visual.get("image_size", 448), out=visual["output_dim"],
        )

    @property
    def grid(self) -> int:
        return self.image_size // self.patch


def resize_grid(table: paddle.Tensor, grid: int) -> paddle.Tensor:
    """A [side*side, C] table of grid positions resized to [grid*grid, C], bicubic like torch's
    F.interpolate(align_corners=False); the same size gives the table back exactly."""
    side = math.isqrt(table.shape[0])
    image = table.reshape([1, side, side, -1]).transpose([0, 3, 1, 2])
    image = F.interpolate(image, size=[grid, grid], mode="bicubic", align_corners=False)
    return image.transpose([0, 2, 3, 1]).reshape([grid * grid, -1])


class QwenViTAttention(nn.Layer):
    """ViT self-attention: in_proj output viewed as (heads, 3*head_dim), each head's [q; k; v] together."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.width, self.heads = width, heads
        self.in_proj = _linear(width, 3 * width)
        self.out_proj = _linear(width, width)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        mixed = self.in_proj(x).reshape([0, 0, self.heads, 3 * (self.width // self.heads)])
        q, k, v = (t.transpose([0, 2, 1, 3]) for t in paddle.split(mixed, 3, axis=-1))
        return self.out_proj(_attention(q, k, v, None).transpose([0, 2, 1, 3]).reshape([0, 0, self.width]))


class QwenViTMLP(nn.Layer):
    def __init__(self, width: int, inner: int) -> None:
        super().__init__()
        self.c_fc = _linear(width, inner)
        self.c_proj = _linear(inner, width)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class QwenViTBlock(nn.Layer):
    """One `resblocks.N`: x + attn(ln_1(x)), then + mlp(ln_2(x)); no mask."""

    def __init__(self, dims: QwenVLDims) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(dims.v_width, 1e-6)
        self.attn = QwenViTAttention(dims.v_width, dims.v_heads)
        self.ln_2 = LayerNorm(dims.v_width, 1e-6)
        self.mlp = QwenViTMLP(dims.v_width, dims.v_mlp)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class QwenViTLayers(nn.Layer):
    def __init__(self, dims: QwenVLDims, depth: int) -> None:
        super().__init__()
        self.resblocks = nn.LayerList([QwenViTBlock(dims) for _ in range(depth)])


class QwenViT(nn.Layer):
    """`visual.vit`: conv1 patches, interpolated positions, ln_pre, `depth` blocks (0 when streamed)."""

    def __init__(self, dims: QwenVLDims, depth: int) -> None:
        super().__init__()
        self.grid, self.patch = dims.grid, dims.patch
        self.conv1 = nn.Conv2D(3, dims.v_width, dims.patch, stride=dims.patch, bias_attr=False)
        self.positional_embedding = self.create_parameter([256, dims.v_width])
        self.ln_pre = LayerNorm(dims.v_width, 1e-6)
        self.transformer = QwenViTLayers(dims, depth)

    def embed(self, pixel_values: paddle.Tensor) -> paddle.Tensor:
        """[B, 3, S, S] pixels to the first block's input [B, grid*grid, width]."""
        x = F.conv2d(pixel_values, _f32(self.conv1.weight), stride=self.patch).flatten(2).transpose([0, 2, 1])
        return self.ln_pre(x + resize_grid(_f32(self.positional_embedding), self.grid))

    def forward(self, pixel_values: paddle.Tensor) -> paddle.Tensor:
        x = self.embed(pixel_values)
        for block in self.transformer.resblocks:
            x = block(x)
        return x


class PoolAttention(nn.Layer):
    """torch nn.MultiheadAttention semantics, with in_proj_weight stored [D, 3D] (columns q, k, v)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.width, self.heads = width, heads
        self.in_proj_weight = self.create_parameter([width, 3 * width])
        self.in_proj_bias = self.create_parameter([3 * width], is_bias=True)
        self.out_proj = _linear(width, width)

    def forward(self, query: paddle.Tensor, key: paddle.Tensor, value: paddle.Tensor) -> paddle.Tensor:
        weights = paddle.split(_f32(self.in_proj_weight), 3, axis=1)
        biases = paddle.split(_f32(self.in_proj_bias), 3)
        q, k, v = (
            (paddle.matmul(x, w) + b).reshape([0, 0, self.heads, self.width // self.heads]).transpose([0, 2, 1, 3])
            for x, w, b in zip((query, key, value), weights, biases)
        )
        return self.out_proj(_attention(q, k, v, None).transpose([0, 2, 1, 3]).reshape([0, 0, self.width]))


class Resampler(nn.Layer):
    """`visual.attn_pool`: 256 learned queries attend over the ViT's patches."""

    def __init__(self, dims: QwenVLDims) -> None:
        super().__init__()
        self.grid = dims.grid
        self.query = self.create_parameter([256, dims.out])
        self.pos_embed = self.create_parameter([256, dims.out])
        self.kv_proj = _linear(dims.v_width, dims.out, bias=False) if dims.v_width != dims.out else None
        self.attn = PoolAttention(dims.out, dims.out // 128)
        self.ln_q = LayerNorm(dims.out, 1e-6)
        self.ln_kv = LayerNorm(dims.out, 1e-6)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.kv_proj is not None:
            x = self.kv_proj(x)
        x = self.ln_kv(x)
        pos_embed = _f32(self.pos_embed)
        query = (self.ln_q(_f32(self.query)) + pos_embed).unsqueeze(0)
        return self.attn(query, x + resize_grid(pos_embed, self.grid), x)


class QwenVisual(nn.Layer):
    """`visual`: ViT, resampler, ln_post, then x @ proj (a bare [D, D] parameter)."""

    def __init__(self, dims: QwenVLDims, depth: int) -> None:
        super().__init__()
        self.vit = QwenViT(dims, depth)
        self.attn_pool = Resampler(dims)
        self.ln_post = LayerNorm(dims.out, 1e-6)
        self.proj = self.create_parameter([dims.out, dims.out])

    def pool(self, x: paddle.Tensor) -> paddle.Tensor:
        """ViT output [B, N, width] to image features [B*256, out]."""
        return paddle.matmul(self.ln_post(self.attn_pool(x)), _f32(self.proj)).reshape([-1, self.proj.shape[1]])

    def forward(self, pixel_values: paddle.Tensor) -> paddle.Tensor:
        return self.pool(self.vit(pixel_values))


class Rope1D(nn.Layer):
    """Rotary angles over the whole head from 1-D positions."""

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        self.register_buffer("inv_freq", _inv_freq(head_dim, base), persistable=False)

    def forward(self, position_ids: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        freqs = position_ids.astype("float32").unsqueeze(-1) * self.inv_freq
        emb = paddle.concat([freqs, freqs], axis=-1)
        return paddle.cos(emb), paddle.sin(emb)


class QWenAttention(nn.Layer):
    """c_attn (output [q; k; v], each hidden wide) with rotary, causal attention, c_proj without bias."""

    def __init__(self, dims: QwenVLDims) -> None:
        super().__init__()
        self.hidden, self.heads = dims.hidden, dims.heads
        self.c_attn = _linear(dims.hidden, 3 * dims.hidden)
        self.c_proj = _linear(dims.hidden, dims.hidden, bias=False)

    def forward(self, x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor, mask: paddle.Tensor | None,
                past: Cache | None = None) -> tuple[paddle.Tensor, Cache]:
        """The output for new tokens `x` after the `past` keys and values, and those extended by x's."""
        q, k, v = (t.reshape([-1, self.heads, self.hidden // self.heads]).transpose([1, 0, 2])
                   for t in paddle.split(self.c_attn(x), 3, axis=-1))
        k, v = _extend(past, _rotate(k, cos, sin), v)
        out = _attention(_rotate(q, cos, sin), k, v, mask)
        return self.c_proj(out.transpose([1, 0, 2]).reshape([-1, self.hidden])), (k, v)


class QWenMLP(nn.Layer):
    """c_proj(w1(x) * silu(w2(x))): w2 is the gate."""

    def __init__(self, dims: QwenVLDims) -> None:
        super().__init__()
        self.w1 = _linear(dims.hidden, dims.mlp, bias=False)
        self.w2 = _linear(dims.hidden, dims.mlp, bias=False)
        self.c_proj = _linear(dims.mlp, dims.hidden, bias=False)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QWenBlock(PreNormLayer):
    """One `h.N` layer."""

    def __init__(self, dims: QwenVLDims) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(dims.hidden, dims.eps)
        self.attn = QWenAttention(dims)
        self.ln_2 = RMSNorm(dims.hidden, dims.eps)
        self.mlp = QWenMLP(dims)

    def parts(self) -> tuple[nn.Layer, nn.Layer, nn.Layer, nn.Layer]:
        return self.ln_1, self.attn, self.ln_2, self.mlp


class QWenLLM(TextModel):
    """`transformer.llm`: wte (resident only), h layers, ln_f."""

    embedding_key, layers_key, layer_class = "wte.weight", "h", QWenBlock

    def __init__(self, dims: QwenVLDims, layers: int, *, embedding: bool) -> None:
        super().__init__()
        if embedding:
            self.wte = nn.Embedding(dims.vocab, dims.hidden)
        self.h = nn.LayerList([QWenBlock(dims) for _ in range(layers)])
        self.ln_f = RMSNorm(dims.hidden, dims.eps)
        self.rotary = Rope1D(dims.hidden // dims.heads, dims.rope_base)

    def final_norm(self, h: paddle.Tensor) -> paddle.Tensor:
        return self.ln_f(h)


class QWenTransformer(nn.Layer):
    def __init__(self, dims: QwenVLDims) -> None:
        super().__init__()
        self.llm = QWenLLM(dims, dims.layers, embedding=True)


class QwenVLNet(nn.Layer):
    """Qwen-VL in PaddleMIX's HEAD layout: `transformer.llm`, `visual`, `lm_head`."""

    def __init__(self, dims: QwenVLDims) -> None:
        super().__init__()
        self.transformer = QWenTransformer(dims)
        self.visual = QwenVisual(dims, dims.v_layers)
        self.lm_head = _linear(dims.hidden, dims.vocab, bias=False)

    def forward(self, input_ids: paddle.Tensor, position_ids: paddle.Tensor, image_embeds: paddle.Tensor,
                image_mask: paddle.Tensor) -> paddle.Tensor:
        return self.lm_head(self.transformer.llm(input_ids, position_ids, image_embeds, image_mask))


# ---------------------------------------------------------------------------------------------------
# Weights


class StreamedWeights:
    """Layer weights read tensor by tensor from a converted checkpoint, decoded to float32.

    Every method takes network names; `names` gives the checkpoint's name for each (default: the same)."""

    def __init__(self, checkpoint: Checkpoint, names: dict[str, str] | None = None) -> None:
        self.checkpoint = checkpoint
        self.names = names or {}

    def stored(self, name: str) -> str:
        """The checkpoint's name for the network's tensor `name`."""
        return self.names.get(name, name)

    def read(self, name: str) -> np.ndarray:
        stored = self.stored(name)
        return _float32(self.checkpoint.read(stored), self.checkpoint.tensors[stored].dtype)

    def fill(self, layer: nn.Layer, prefix: str) -> nn.Layer:
        """`layer` with every parameter set from the checkpoint tensor `prefix` + its name."""
        layer.set_state_dict({key: self.read(prefix + key) for key in layer.state_dict()})
        return layer

    def rows(self, name: str, ids: np.ndarray) -> paddle.Tensor:
        """Rows `ids` of a 2-D table, reading only those rows."""
        stored = self.stored(name)
        return paddle.to_tensor(_float32(self.checkpoint.read_rows(stored, ids), self.checkpoint.tensors[stored].dtype))

    def head(self, h: paddle.Tensor, name: str, *, tied: bool) -> np.ndarray:
        """h @ lm_head in blocks: `name` is [hidden, vocab] (Paddle's lm_head) or, tied, the [vocab, hidden] table."""
        stored = self.stored(name)
        dtype = self.checkpoint.tensors[stored].dtype
        blocks = self.checkpoint.iter_blocks(stored, HEAD_BLOCK, axis=0 if tied else 1)
        return np.concatenate(
            [paddle.matmul(h, paddle.to_tensor(_float32(block, dtype)), transpose_y=tied).numpy() for block in blocks],
            axis=1,
        )


def _float32(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype not in ("bfloat16", "float16", "float32", "float64"):
        raise CheckFailed(f"a {dtype} tensor where the network needs floating-point weights")
    return float32_values(values, dtype)


def _parameter_shapes(net: nn.Layer) -> dict[str, tuple[int, ...]]:
    return {name: tuple(value.shape) for name, value in net.state_dict().items()}


def _stored_names(checkpoint: Checkpoint, family: str, network_names: Iterable[str]) -> dict[str, str]:
    """The checkpoint's name for each network name, through the family's key map: the network's layout
    (PaddleMIX) to official names to the layout the checkpoint's names are in. A checkpoint in no layout
    the key map declares is taken as the network's names, and the fit check lists what does not fit."""
    keymap = load_keymap(family)
    network = keymap.layouts[NETWORK_LAYOUT]
    detected = detect_layout(family, checkpoint.tensors, checkpoint.config)
    stored = network if detected == UNKNOWN else keymap.layouts[detected]
    if stored.transpose != network.transpose:
        raise CheckFailed(f"{checkpoint.root}: the weights are in the {detected} layout, which stores Linear weights "
                          f"as torch does ([out, in]); the Paddle network takes a Paddle layout ([in, out])")
    return {name: stored.from_official(network.to_official(name)) for name in network_names}


def _check_fit(path: Path, family: str, expected: dict[str, tuple[int, ...]],
               found: dict[str, tuple[int, ...]]) -> None:
    """Raise CheckFailed naming every missing, unexpected and mis-shaped key (`expected` and `found` both
    by the checkpoint's names)."""
    problems = {
        "missing": [name for name in expected if name not in found],
        "unexpected": [name for name in found if name not in expected],
        "mis-shaped": [f"{name} {list(found[name])} (network {list(expected[name])})"
                       for name in expected if name in found and tuple(found[name]) != expected[name]],
    }
    listed = [f"{kind} ({len(names)}): {', '.join(names[:_SHOWN_KEYS])}{', ...' if len(names) > _SHOWN_KEYS else ''}"
              for kind, names in problems.items() if names]
    if listed:
        raise CheckFailed(f"{path}: the weights do not fit the {family} network its config.json describes; "
                          + "; ".join(listed))


def _stored_shapes(expected: dict[str, tuple[int, ...]], names: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """The network's parameter shapes by the checkpoint's names."""
    return {names[name]: shape for name, shape in expected.items()}


def _load_shards(net: nn.Layer, checkpoint: Checkpoint, family: str, names: dict[str, str]) -> None:
    """paddle.load each shard and set_state_dict the tensors that fit, renamed to the network's names and
    cast to float32; then check."""
    expected = _parameter_shapes(net)
    network_name = {stored: name for name, stored in names.items()}
    found: dict[str, tuple[int, ...]] = {}
    for shard in checkpoint.shards:
        state = paddle.load(str(checkpoint.root / shard))
        fitting = {}
        for stored, tensor in state.items():
            found[stored] = tuple(tensor.shape)
            name = network_name.get(stored)
            if name is not None and expected[name] == found[stored]:
                fitting[name] = _f32(tensor)
        with warnings.catch_warnings():
            # each shard holds a part of the network: Paddle would warn about every other part
            warnings.filterwarnings("ignore", message="Skip loading for")
            net.set_state_dict(fitting)
        del state, fitting
    _check_fit(checkpoint.root, family, _stored_shapes(expected, names), found)


def _family_dims(path: Path, config: dict | None) -> tuple[str, Qwen2Dims | QwenVLDims]:
    family = family_of_config(config)
    if family is None:
        raise UserError(f"{path}: no config.json whose model_type is qwen, qwen2_vl or qwen2_5_vl")
    try:
        return family.name, (QwenVLDims if family.name == "qwen_vl" else Qwen2Dims).from_config(config)
    except KeyError as exc:
        raise UserError(f"{path}/config.json lacks {exc.args[0]!r}") from None


def _pdparams_entry(path: Path) -> Path:
    for name in ("model_state.pdparams.index.json", "model_state.pdparams"):
        if (path / name).is_file():
            return path / name
    raise UserError(f"no model_state.pdparams[.index.json] in {path}: convert it first (vlhub convert SRC --to paddle)")


# ---------------------------------------------------------------------------------------------------
# The forward


class PaddleForward:
    """One family's Paddle network over a converted checkpoint directory."""

    def __init__(self, path: Path, *, streamed: bool) -> None:
        self.path = Path(path)
        self.streamed = streamed
        self._net: nn.Layer | None = None
        self._weights: StreamedWeights | None = None
        checkpoint = open_checkpoint(_pdparams_entry(self.path), bf16=True)  # Paddle reads uint16 as bf16
        try:
            self.family, self.dims = _family_dims(self.path, checkpoint.config)
            if streamed:
                with paddle.LazyGuard():  # shapes only: nothing is allocated
                    expected = _parameter_shapes(self._build())
                names = _stored_names(checkpoint, self.family, expected)
                _check_fit(self.path, self.family, _stored_shapes(expected, names),
                           {n: m.shape for n, m in checkpoint.tensors.items()})
                self._weights = StreamedWeights(checkpoint, names)
            else:
                self._net = self._build()
                self._net.eval()
                names = _stored_names(checkpoint, self.family, self._net.state_dict())
                _load_shards(self._net, checkpoint, self.family, names)
        finally:
            if self._weights is None:
                checkpoint.close()

    @property
    def net(self) -> nn.Layer | None:
        """The resident network (None when streamed), e.g. for paddle.jit.to_static."""
        return self._net

    def _build(self) -> nn.Layer:
        return QwenVLNet(self.dims) if isinstance(self.dims, QwenVLDims) else Qwen2VLNet(self.dims)

    def encode_images(self, pixel_values: np.ndarray, **vision_inputs: np.ndarray) -> np.ndarray:
        """Image features [n_image_tokens, hidden] float32.

        Qwen2(.5)-VL: pixel_values [N, C*T*P*P] patches and `vision_position_ids` [N, 2], `full_mask`
        [N, N]; Qwen2.5-VL also `window_index`, `reverse_index` [N/4] and `window_mask` [N, N] (window order).
        Qwen-VL: pixel_values [B, 3, S, S], already normalised, and nothing else.
        """
        with paddle.no_grad():
            if isinstance(self.dims, QwenVLDims):
                out = self._qwen_vl_vision(self._qwen_vl_pixels(pixel_values, vision_inputs))
            else:
                out = self._qwen2_vision(*self._qwen2_vision_inputs(pixel_values, **vision_inputs))
        return out.numpy()

    def logits(self, input_ids: np.ndarray, position_ids: np.ndarray, image_embeds: np.ndarray,
               image_mask: np.ndarray) -> np.ndarray:
        """Causal logits [L, vocab] float32; the positions `image_mask` marks take `image_embeds` rows in order."""
        ids, positions, embeds, mask = self._text_inputs(input_ids, position_ids, image_embeds, image_mask)
        with paddle.no_grad():
            if self._net is not None:
                return self._net(ids, positions, embeds, mask).numpy()
            return self._stream_logits(ids, positions, embeds, mask)

    def close(self) -> None:
        """Close the streamed checkpoint's open shard (resident weights need nothing)."""
        if self._weights is not None:
            self._weights.checkpoint.close()

    # -- vision

    def _qwen2_vision_inputs(self, pixel_values: np.ndarray, *, vision_position_ids: np.ndarray,
                             full_mask: np.ndarray, window_index: np.ndarray | None = None,
                             reverse_index: np.ndarray | None = None,
                             window_mask: np.ndarray | None = None) -> list[paddle.Tensor | None]:
        dims = self.dims
        patches = len(pixel_values)
        given = [x is not None for x in (window_index, reverse_index, window_mask)]
        if all(given) != dims.qwen2_5 or any(given) != dims.qwen2_5:
            raise ValueError("window_index, reverse_index and window_mask are Qwen2.5-VL's inputs, and all three are")
        width = dims.in_chans * dims.temporal_patch * dims.patch**2
        if pixel_values.shape != (patches, width) or patches % dims.merge**2:
            raise ValueError(f"pixel_values is {list(pixel_values.shape)}; expected [N, {width}], N a multiple of "
                             f"{dims.merge**2}")
        if vision_position_ids.shape != (patches, 2) or full_mask.shape != (patches, patches):
            raise ValueError(f"vision_position_ids must be [{patches}, 2] and full_mask [{patches}, {patches}]")
        tensors = [_float_tensor(pixel_values), _int_tensor(vision_position_ids), _float_tensor(full_mask)]
        if dims.qwen2_5:
            groups = patches // dims.merge**2
            if window_index.shape != (groups,) or reverse_index.shape != (groups,) or window_mask.shape != full_mask.shape:
                raise ValueError(f"window_index and reverse_index must be [{groups}], window_mask [{patches}, {patches}]")
            tensors += [_int_tensor(window_index), _int_tensor(reverse_index), _float_tensor(window_mask)]
        return tensors

    def _qwen2_vision(self, pixel_values: paddle.Tensor, positions: paddle.Tensor, full_mask: paddle.Tensor,
                      window_index: paddle.Tensor | None = None, reverse_index: paddle.Tensor | None = None,
                      window_mask: paddle.Tensor | None = None) -> paddle.Tensor:
        if self._net is not None:
            return self._net.visual(pixel_values, positions, full_mask, window_index, reverse_index, window_mask)
        tower = self._weights.fill(VisionTower(self.dims, 0), "visual.")
        block = VisionBlock(self.dims)
        x, cos, sin = tower.embed(pixel_values, positions, window_index)
        for i in range(self.dims.v_depth):
            x = self._weights.fill(block, f"visual.blocks.{i}.")(x, cos, sin, tower.block_mask(i, full_mask, window_mask))
        return tower.merge(x, reverse_index)

    def _qwen_vl_pixels(self, pixel_values: np.ndarray, vision_inputs: dict) -> paddle.Tensor:
        if vision_inputs:
            raise ValueError(f"Qwen-VL takes no vision inputs besides pixel_values, not {', '.join(vision_inputs)}")
        size = self.dims.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (3, size, size):
            raise ValueError(f"pixel_values is {list(pixel_values.shape)}; Qwen-VL takes [B, 3, {size}, {size}]")
        return _float_tensor(pixel_values)

    def _qwen_vl_vision(self, pixel_values: paddle.Tensor) -> paddle.Tensor:
        if self._net is not None:
            return self._net.visual(pixel_values)
        visual = self._weights.fill(QwenVisual(self.dims, 0), "visual.")
        block = QwenViTBlock(self.dims)
        x = visual.vit.embed(pixel_values)
        for i in range(self.dims.v_layers):
            x = self._weights.fill(block, f"visual.vit.transformer.resblocks.{i}.")(x)
        return visual.pool(x)

    # -- text

    def _text_inputs(self, input_ids: np.ndarray, position_ids: np.ndarray, image_embeds: np.ndarray,
                     image_mask: np.ndarray) -> tuple[paddle.Tensor, ...]:
        dims = self.dims
        length = len(input_ids)
        if input_ids.ndim != 1 or not length:
            raise ValueError(f"input_ids must be a non-empty 1-D array, not {list(input_ids.shape)}")
        if input_ids.min() < 0 or input_ids.max() >= dims.vocab:
            raise ValueError(f"input_ids must lie in [0, {dims.vocab})")
        if isinstance(dims, QwenVLDims):
            if length > dims.seq_length:
                # dynamic NTK and logn scaling change the numbers past seq_length; below it they are identities
                raise UserError(f"{length} tokens: Qwen-VL's forward here stops at seq_length {dims.seq_length}")
            positions_shape: tuple[int, ...] = (length,)
        else:
            positions_shape = (3, length)
        if position_ids.shape != positions_shape:
            raise ValueError(f"position_ids is {list(position_ids.shape)}; expected {list(positions_shape)}")
        mask = np.asarray(image_mask, dtype=bool)
        if mask.shape != (length,) or image_embeds.ndim != 2 or image_embeds.shape != (int(mask.sum()), dims.hidden):
            raise ValueError(f"image_mask must be [{length}] and image_embeds [marked positions, {dims.hidden}], "
                             f"not {list(mask.shape)} and {list(image_embeds.shape)}")
        return _int_tensor(input_ids), _int_tensor(position_ids), _float_tensor(image_embeds), paddle.to_tensor(mask)

    def _stream_logits(self, ids: paddle.Tensor, positions: paddle.Tensor, embeds: paddle.Tensor,
                       mask: paddle.Tensor) -> np.ndarray:
        """The resident text model's forward with one layer's weights in memory at a time."""
        qwen_vl = isinstance(self.dims, QwenVLDims)
        prefix, text_class = ("transformer.llm.", QWenLLM) if qwen_vl else ("model.", Qwen2TextModel)
        text = self._weights.fill(text_class(self.dims, 0, embedding=False), prefix)
        layer = text_class.layer_class(self.dims)
        embedding = prefix + text.embedding_key
        h, cos, sin, causal = text.prepare(self._weights.rows(embedding, ids.numpy()), positions, embeds, mask)
        for i in range(self.dims.layers):
            h = self._weights.fill(layer, f"{prefix}{text.layers_key}.{i}.")(h, cos, sin, causal)
        tied = not qwen_vl and self.dims.tied
        return self._weights.head(text.final_norm(h), embedding if tied else "lm_head.weight", tied=tied)


def _float_tensor(values: np.ndarray) -> paddle.Tensor:
    return paddle.to_tensor(np.ascontiguousarray(values, dtype=np.float32))


def _int_tensor(values: np.ndarray) -> paddle.Tensor:
    return paddle.to_tensor(np.ascontiguousarray(values, dtype=np.int64))
