"""Qwen-VL's Paddle network in PaddleMIX's current names (`transformer.llm.*`, `visual.*`): a ViT over the fixed
square image with a bicubic-resized position table, the attention pool of 256 queries, and QWen decoder layers
(docs/facts/paddle.md#qwen-vl-paddlemix-names)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn
from paddle.static import InputSpec

from vlhub.errors import UserError
from vlhub.smoke.paddle_forward import (
    Cache,
    LayerNorm,
    PaddleFamily,
    PreNormLayer,
    RMSNorm,
    StreamedWeights,
    TextModel,
    as_float32,
    attention,
    extend,
    float_tensor,
    inverse_frequencies,
    linear,
    rotate,
)

POOL_QUERIES = 256  # the resampler's fixed output: 256 tokens per image
POSITIONS = 256  # the ViT's learned position table: a 16 x 16 grid, resized to the image's
POOL_HEAD_DIM = 128  # the attention pool's heads are output_dim / 128 wide


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
        self.in_proj = linear(width, 3 * width)
        self.out_proj = linear(width, width)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        mixed = self.in_proj(x).reshape([0, 0, self.heads, 3 * (self.width // self.heads)])
        q, k, v = (t.transpose([0, 2, 1, 3]) for t in paddle.split(mixed, 3, axis=-1))
        return self.out_proj(attention(q, k, v, None).transpose([0, 2, 1, 3]).reshape([0, 0, self.width]))


class QwenViTMLP(nn.Layer):
    def __init__(self, width: int, inner: int) -> None:
        super().__init__()
        self.c_fc = linear(width, inner)
        self.c_proj = linear(inner, width)

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
        self.positional_embedding = self.create_parameter([POSITIONS, dims.v_width])
        self.ln_pre = LayerNorm(dims.v_width, 1e-6)
        self.transformer = QwenViTLayers(dims, depth)

    def embed(self, pixel_values: paddle.Tensor) -> paddle.Tensor:
        """[B, 3, S, S] pixels to the first block's input [B, grid*grid, width]."""
        x = F.conv2d(pixel_values, as_float32(self.conv1.weight), stride=self.patch).flatten(2).transpose([0, 2, 1])
        return self.ln_pre(x + resize_grid(as_float32(self.positional_embedding), self.grid))

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
        self.out_proj = linear(width, width)

    def forward(self, query: paddle.Tensor, key: paddle.Tensor, value: paddle.Tensor) -> paddle.Tensor:
        weights = paddle.split(as_float32(self.in_proj_weight), 3, axis=1)
        biases = paddle.split(as_float32(self.in_proj_bias), 3)
        q, k, v = (
            (paddle.matmul(x, w) + b).reshape([0, 0, self.heads, self.width // self.heads]).transpose([0, 2, 1, 3])
            for x, w, b in zip((query, key, value), weights, biases)
        )
        return self.out_proj(attention(q, k, v, None).transpose([0, 2, 1, 3]).reshape([0, 0, self.width]))


class Resampler(nn.Layer):
    """`visual.attn_pool`: 256 learned queries attend over the ViT's patches."""

    def __init__(self, dims: QwenVLDims) -> None:
        super().__init__()
        self.grid = dims.grid
        self.query = self.create_parameter([POOL_QUERIES, dims.out])
        self.pos_embed = self.create_parameter([POOL_QUERIES, dims.out])
        self.kv_proj = linear(dims.v_width, dims.out, bias=False) if dims.v_width != dims.out else None
        self.attn = PoolAttention(dims.out, dims.out // POOL_HEAD_DIM)
        self.ln_q = LayerNorm(dims.out, 1e-6)
        self.ln_kv = LayerNorm(dims.out, 1e-6)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.kv_proj is not None:
            x = self.kv_proj(x)
        x = self.ln_kv(x)
        pos_embed = as_float32(self.pos_embed)
        query = (self.ln_q(as_float32(self.query)) + pos_embed).unsqueeze(0)
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
        return paddle.matmul(self.ln_post(self.attn_pool(x)), as_float32(self.proj)).reshape([-1, self.proj.shape[1]])

    def forward(self, pixel_values: paddle.Tensor) -> paddle.Tensor:
        return self.pool(self.vit(pixel_values))


class Rope1D(nn.Layer):
    """Rotary angles over the whole head from 1-D positions."""

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inverse_frequencies(head_dim, base), persistable=False)

    def forward(self, position_ids: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        freqs = position_ids.astype("float32").unsqueeze(-1) * self.inv_freq
        emb = paddle.concat([freqs, freqs], axis=-1)
        return paddle.cos(emb), paddle.sin(emb)


class QWenAttention(nn.Layer):
    """c_attn (output [q; k; v], each hidden wide) with rotary, causal attention, c_proj without bias."""

    def __init__(self, dims: QwenVLDims) -> None:
        super().__init__()
        self.hidden, self.heads = dims.hidden, dims.heads
        self.c_attn = linear(dims.hidden, 3 * dims.hidden)
        self.c_proj = linear(dims.hidden, dims.hidden, bias=False)

    def forward(self, x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor, mask: paddle.Tensor | None,
                past: Cache | None = None) -> tuple[paddle.Tensor, Cache]:
        """The output for new tokens `x` after the `past` keys and values, and those extended by x's."""
        q, k, v = (t.reshape([-1, self.heads, self.hidden // self.heads]).transpose([1, 0, 2])
                   for t in paddle.split(self.c_attn(x), 3, axis=-1))
        k, v = extend(past, rotate(k, cos, sin), v)
        out = attention(rotate(q, cos, sin), k, v, mask)
        return self.c_proj(out.transpose([1, 0, 2]).reshape([-1, self.hidden])), (k, v)


class QWenMLP(nn.Layer):
    """c_proj(w1(x) * silu(w2(x))): w2 is the gate."""

    def __init__(self, dims: QwenVLDims) -> None:
        super().__init__()
        self.w1 = linear(dims.hidden, dims.mlp, bias=False)
        self.w2 = linear(dims.hidden, dims.mlp, bias=False)
        self.c_proj = linear(dims.mlp, dims.hidden, bias=False)

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
        self.lm_head = linear(dims.hidden, dims.vocab, bias=False)

    def forward(self, input_ids: paddle.Tensor, position_ids: paddle.Tensor, image_embeds: paddle.Tensor,
                image_mask: paddle.Tensor) -> paddle.Tensor:
        return self.lm_head(self.transformer.llm(input_ids, position_ids, image_embeds, image_mask))



class Network(PaddleFamily):
    """`PaddleFamily` for Qwen-VL: 1-D rotary positions, every head its own key and value, lm_head never tied; its
    static rotary is exact up to `seq_length`, where the model starts scaling it (dynamic NTK)."""

    text_prefix = "transformer.llm."
    limit_name = "seq_length"
    positions_rows = None

    def __init__(self, config: dict) -> None:
        self.dims = dims = QwenVLDims.from_config(config)
        self.hidden, self.vocab, self.layers = dims.hidden, dims.vocab, dims.layers
        self.heads, self.kv_heads, self.tied, self.position_limit = dims.heads, dims.heads, False, dims.seq_length

    def build(self) -> nn.Layer:
        return QwenVLNet(self.dims)

    def vision_tensors(self, pixel_values: np.ndarray, vision_inputs: dict[str, np.ndarray]) -> list[paddle.Tensor]:
        if vision_inputs:
            raise ValueError(f"Qwen-VL takes no vision inputs besides pixel_values, not {', '.join(vision_inputs)}")
        size = self.dims.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (3, size, size):
            raise ValueError(f"pixel_values is {list(pixel_values.shape)}; Qwen-VL takes [B, 3, {size}, {size}]")
        return [float_tensor(pixel_values)]

    def stream_vision(self, weights: StreamedWeights, tensors: list[paddle.Tensor]) -> paddle.Tensor:
        visual = weights.fill(QwenVisual(self.dims, 0), "visual.")
        block = QwenViTBlock(self.dims)
        x = visual.vit.embed(tensors[0])
        for i in range(self.dims.v_layers):
            x = weights.fill(block, f"visual.vit.transformer.resblocks.{i}.")(x)
        return visual.pool(x)

    def text_model(self, net: nn.Layer | None = None) -> TextModel:
        return net.transformer.llm if net is not None else QWenLLM(self.dims, 0, embedding=False)

    def head(self, net: nn.Layer) -> paddle.Tensor:
        return net.lm_head.weight

    def vision_graph(self, net: nn.Layer) -> tuple[Callable, list]:
        size = self.dims.image_size
        return net.visual.forward, [InputSpec([None, 3, size, size], "float32", "pixel_values")]
