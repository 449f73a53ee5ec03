"""Qwen3-VL's Paddle network, dense and MoE, under PaddleFormers' names: the Hugging Face names it loads as they are
(`model.visual.*`, `model.language_model.*`, `lm_head.weight`), its Linear weights Paddle's [in, out], transposed
from the stored torch [out, in] as they load, the experts as stored (`mlp.experts.gate_up_proj` [E, H, 2Ie], gate
the first Ie columns, and `mlp.experts.down_proj` [E, Ie, H]), the head the embedding when tied
(docs/facts/paddleformers-qwen3-vl.md; `[paddle]` in family.toml).

Vision (`model.visual`): 16-pixel patches projected by the Conv3d (a matmul with its bias), plus the learned position
table resampled to the grid through the four taps the input gives per patch (`interp_indices`, `interp_weights`);
LayerNorm blocks attending within each frame (`full_mask`), rotated by the 2-D rotary, with an MLP of `hidden_act`;
the merger (LayerNorm per patch, then 2x2 groups, fc1, exact GELU, fc2) and one DeepStack merger per listed block
(grouping, then LayerNorm over the group). The tower returns [1 + features, image tokens, hidden]: the main merger's
output, then the DeepStack features in block order, feature j added to decoder layer j's output at the image
positions (`vlhub/smoke/paddle_table_vision.py`, which Qwen3.5's tower, without DeepStack, shares).

Text (`model.language_model`): pre-norm decoder layers with per-head RMSNorm on q and k before the rotary, no
biases, `head_dim` of its own, interleaved multimodal rotary; a SwiGLU MLP, or (MoE, every layer) a router softmax,
top-k, renormalised, over SwiGLU experts of which only the routed ones are computed, and (streamed) read one
expert's slice at a time (`vlhub/smoke/paddle_experts.py`). The routing picks experts by value, so the MoE network
runs in dygraph only; the dense one (vision and text) traces whole with `paddle.jit.to_static`. Equal to the numpy
reference (`reference.py`) and so to transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import paddle
from paddle import nn

from vlhub.errors import UserError
from vlhub.smoke.paddle_experts import RoutedExperts
from vlhub.smoke.paddle_forward import (
    Cache,
    GatedMLP,
    PreNormLayer,
    RMSNorm,
    TextModel,
    attention,
    causal_mask,
    extend,
    linear,
    merge_image_embeds,
    rotate,
)
from vlhub.smoke.paddle_mrope import MRope
from vlhub.smoke.paddle_table_vision import ModelDims, TableVisionNetwork, config_dims, vision_specs

# transformers' defaults for what a config.json may leave out (as reference.py)
DEFAULT_MROPE_SECTION = (24, 20, 20)
DEFAULT_ROPE_THETA = 500000.0


@dataclass(frozen=True)
class Qwen3VLDims(ModelDims):
    """What the network needs from config.json: the fields `ModelDims` reads, and the rotary's."""

    @classmethod
    def from_config(cls, config: dict) -> Qwen3VLDims:
        d, flat = config_dims(config)
        rope = next((value for key in ("rope_parameters", "rope_scaling")
                     if isinstance(value := flat.get(key), dict) and "mrope_section" in value), {})
        section = tuple(int(n) for n in rope.get("mrope_section", DEFAULT_MROPE_SECTION))
        if len(section) != 3 or sum(section) * 2 != d["head_dim"]:
            raise UserError(f"mrope_section {list(section)} does not cover head_dim {d['head_dim']} / 2")
        return cls.from_dims(
            d, flat, deepstack=True,
            rope_theta=float(flat.get("rope_theta", rope.get("rope_theta", DEFAULT_ROPE_THETA))),
            mrope_section=section,
        )


# ---------------------------------------------------------------------------------------------------
# Text


class Attention(nn.Layer):
    """q/k/v/o projections without biases, RMSNorm per head on q and k, rotary, grouped-query causal attention."""

    def __init__(self, dims: Qwen3VLDims) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = dims.heads, dims.kv_heads, dims.head_dim
        self.q_proj = linear(dims.hidden, dims.heads * dims.head_dim, bias=False)
        self.k_proj = linear(dims.hidden, dims.kv_heads * dims.head_dim, bias=False)
        self.v_proj = linear(dims.hidden, dims.kv_heads * dims.head_dim, bias=False)
        self.o_proj = linear(dims.heads * dims.head_dim, dims.hidden, bias=False)
        self.q_norm = RMSNorm(dims.head_dim, dims.eps)
        self.k_norm = RMSNorm(dims.head_dim, dims.eps)

    def forward(self, x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor, mask: paddle.Tensor | None,
                past: Cache | None = None) -> tuple[paddle.Tensor, Cache]:
        """The output for new tokens `x` after the `past` keys and values, and those extended by x's."""
        q = self.q_norm(self.q_proj(x).reshape([-1, self.heads, self.head_dim])).transpose([1, 0, 2])
        k = self.k_norm(self.k_proj(x).reshape([-1, self.kv_heads, self.head_dim])).transpose([1, 0, 2])
        v = self.v_proj(x).reshape([-1, self.kv_heads, self.head_dim]).transpose([1, 0, 2])
        k, v = extend(past, rotate(k, cos, sin), v)
        repeat = self.heads // self.kv_heads
        out = attention(rotate(q, cos, sin), paddle.repeat_interleave(k, repeat, axis=0),
                        paddle.repeat_interleave(v, repeat, axis=0), mask)
        return self.o_proj(out.transpose([1, 0, 2]).reshape([-1, self.heads * self.head_dim])), (k, v)


class DecoderLayer(PreNormLayer):
    """One decoder layer (`model.language_model.layers.N`): dense (SwiGLU) or, in an MoE model, sparse."""

    def __init__(self, dims: Qwen3VLDims, *, on_demand: bool = False) -> None:
        super().__init__()
        self.self_attn = Attention(dims)
        # the experts as stored: gate_up_proj [E, H, 2Ie], down_proj [E, Ie, H]
        self.mlp = RoutedExperts(dims.hidden, dims.experts, dims.experts_per_token, dims.moe_inner, transposed=False,
                                 on_demand=on_demand) if dims.moe else GatedMLP(dims.hidden, dims.inner, bias=False)
        self.input_layernorm = RMSNorm(dims.hidden, dims.eps)
        self.post_attention_layernorm = RMSNorm(dims.hidden, dims.eps)

    def parts(self) -> tuple[nn.Layer, nn.Layer, nn.Layer, nn.Layer]:
        return self.input_layernorm, self.self_attn, self.post_attention_layernorm, self.mlp


class TextModelQwen3(TextModel):
    """`model.language_model`: token embedding (resident only), decoder layers, final norm; the image positions
    take the main image embeddings, and decoder layer j's output there gains DeepStack feature j."""

    embedding_key, layers_key, layer_class = "embed_tokens.weight", "layers", DecoderLayer

    def __init__(self, dims: Qwen3VLDims, layers: int, *, embedding: bool) -> None:
        super().__init__()
        self.deepstack = len(dims.vision.deepstack or ())
        if embedding:
            self.embed_tokens = nn.Embedding(dims.vocab, dims.hidden)
        self.layers = nn.LayerList([DecoderLayer(dims) for _ in range(layers)])
        self.norm = RMSNorm(dims.hidden, dims.eps)
        self.rotary = MRope(dims.head_dim, dims.rope_theta, dims.mrope_section, interleaved=True)

    def final_norm(self, h: paddle.Tensor) -> paddle.Tensor:
        return self.norm(h)

    def prepare(self, h: paddle.Tensor, position_ids: paddle.Tensor, image_embeds: paddle.Tensor,
                image_mask: paddle.Tensor) -> tuple[paddle.Tensor, ...]:
        cos, sin = self.rotary(position_ids)
        return merge_image_embeds(h, image_embeds[0], image_mask), cos, sin, causal_mask(h)

    def after_layer(self, index: int, h: paddle.Tensor, image_embeds: paddle.Tensor,
                    image_mask: paddle.Tensor) -> paddle.Tensor:
        if index >= self.deepstack:
            return h
        return h + merge_image_embeds(paddle.zeros_like(h), image_embeds[index + 1], image_mask)

    def stream_layer(self, dims: object) -> nn.Layer:
        return DecoderLayer(dims, on_demand=True)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# The family


class Network(TableVisionNetwork):
    dims_class, text_class = Qwen3VLDims, TextModelQwen3

    def image_embeds_shape(self, marked: int) -> tuple[int, ...]:
        return (self.dims.vision.features, marked, self.hidden)

    def vision_graph(self, net: nn.Layer) -> tuple[Callable, list]:
        return net.model.visual.forward, vision_specs(self.dims.vision)
