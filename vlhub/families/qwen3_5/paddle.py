"""Qwen3.5's Paddle network, dense and MoE, under PaddleFormers' names: the Hugging Face names it loads as they are
(`model.visual.*`, `model.language_model.*`, `lm_head.weight`), its Linear weights Paddle's [in, out], transposed from
the stored torch [out, in] as they load; everything else (the experts [E, gate | up, H] and [E, H, Ie], norms, the
convolution [C, 1, K], A_log, dt_bias, embeddings, patch and position tables) as stored (`[paddle]` in family.toml).

Vision (`model.visual`): Qwen3-VL's tower without DeepStack (16-pixel patches, the learned position table resampled
through the input's four taps per patch, LayerNorm blocks attending within each frame under the 2-D rotary, the
merger), shared with it (`vlhub/smoke/paddle_table_vision.py`, as the routed experts: `paddle_experts.py`).
Text (`model.language_model`): each decoder layer as `text_config.layer_types` says, a Gated DeltaNet (`linear_attn`:
causal depthwise convolution, L2-normalised q and k, the gated delta rule token by token, a plain RMSNorm times
silu(z)) or gated full attention (`self_attn`: [q_h | gate_h] per head, `1 + w` q/k norms, partial
interleaved M-RoPE, output times sigmoid(gate)); `1 + w` RMSNorms around them; a SwiGLU MLP or (MoE) routed experts
of which only the routed ones are computed, plus the shared expert scaled by sigmoid(shared_expert_gate).

Streamed, the token mixer of each layer is read when the layer runs (`MixerOnDemand`: the kind whose tensors the
checkpoint holds for that layer), so one layer class serves both kinds. The recurrence and the routing run in
dygraph; there is no static graph of this network (`--to paddle-inference` refuses the family). Equal to the numpy
reference (`reference.py`) and so to transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import paddle
import paddle.nn.functional as F
from paddle import nn

from vlhub.families.qwen3_5.reference import DEFAULT_MROPE_SECTION, DEFAULT_ROPE_THETA, rope_settings, rotary_width
from vlhub.smoke.paddle_experts import RoutedExperts
from vlhub.smoke.paddle_forward import (
    Cache,
    GatedMLP,
    OnDemand,
    PreNormLayer,
    RMSNorm,
    TextModel,
    as_float32,
    attention,
    built_in,
    linear,
    rotate,
)
from vlhub.smoke.paddle_mrope import MRope
from vlhub.smoke.paddle_table_vision import ACTIVATIONS, ModelDims, TableVisionNetwork, config_dims

L2_EPS = 1e-6


@dataclass(frozen=True)
class Qwen3_5Dims(ModelDims):
    """What the network needs from config.json: the fields `ModelDims` reads, which layers are full attention, the
    shared expert's and the linear attention's sizes, and the rotary's."""

    full_layers: tuple[int, ...]
    shared_inner: int
    k_heads: int
    v_heads: int
    k_dim: int
    v_dim: int
    conv_kernel: int
    rotary_dim: int
    act: str  # text_config.hidden_act: after the convolution and in the MLPs (the key map admits ACTIVATIONS' names)

    @classmethod
    def from_config(cls, config: dict) -> Qwen3_5Dims:
        d, flat = config_dims(config)
        rope = rope_settings(config)
        rotary_dim = rotary_width(d["head_dim"], rope)
        # any three sections: the rotary assigns the slots they name and leaves the rest to time, as transformers
        section = tuple(int(n) for n in rope.get("mrope_section", DEFAULT_MROPE_SECTION))
        return cls.from_dims(
            d, flat, deepstack=False,
            full_layers=d["full_layers"], shared_inner=d["shared_inter"], k_heads=d["lin_k_heads"],
            v_heads=d["lin_v_heads"], k_dim=d["lin_k_dim"], v_dim=d["lin_v_dim"], conv_kernel=d["conv_kernel"],
            rope_theta=float(rope.get("rope_theta", DEFAULT_ROPE_THETA)), mrope_section=section, rotary_dim=rotary_dim,
            act=d["act"],
        )


# ---------------------------------------------------------------------------------------------------
# Text


class ZeroCenteredRMSNorm(RMSNorm):
    """RMS normalisation scaled by 1 + w (`Qwen3_5RMSNorm`: the weight is stored zero-centred)."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return x * paddle.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + as_float32(self.weight))


class GatedAttention(nn.Layer):
    """`self_attn`: q_proj's [q_h | gate_h] per head, `1 + w` q/k norms, the rotary on the first `rotary_dim` dims,
    grouped-query causal attention, the output times sigmoid(gate), o_proj; no biases."""

    def __init__(self, dims: Qwen3_5Dims) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.rotary_dim = dims.heads, dims.kv_heads, dims.head_dim, \
            dims.rotary_dim
        self.q_proj = linear(dims.hidden, 2 * dims.heads * dims.head_dim, bias=False)
        self.k_proj = linear(dims.hidden, dims.kv_heads * dims.head_dim, bias=False)
        self.v_proj = linear(dims.hidden, dims.kv_heads * dims.head_dim, bias=False)
        self.o_proj = linear(dims.heads * dims.head_dim, dims.hidden, bias=False)
        self.q_norm = ZeroCenteredRMSNorm(dims.head_dim, dims.eps)
        self.k_norm = ZeroCenteredRMSNorm(dims.head_dim, dims.eps)

    def _rotated(self, x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor) -> paddle.Tensor:
        return paddle.concat([rotate(x[..., :self.rotary_dim], cos, sin), x[..., self.rotary_dim:]], axis=-1)

    def forward(self, x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor, mask: paddle.Tensor | None,
                past: Cache | None = None) -> tuple[paddle.Tensor, None]:
        q_gate = self.q_proj(x).reshape([-1, self.heads, 2 * self.head_dim])
        q, gate = q_gate[..., :self.head_dim], q_gate[..., self.head_dim:].reshape([-1, self.heads * self.head_dim])
        q = self._rotated(self.q_norm(q).transpose([1, 0, 2]), cos, sin)
        k = self._rotated(self.k_norm(self.k_proj(x).reshape([-1, self.kv_heads, self.head_dim])).transpose([1, 0, 2]),
                          cos, sin)
        v = self.v_proj(x).reshape([-1, self.kv_heads, self.head_dim]).transpose([1, 0, 2])
        repeat = self.heads // self.kv_heads
        out = attention(q, paddle.repeat_interleave(k, repeat, axis=0), paddle.repeat_interleave(v, repeat, axis=0),
                        mask)
        out = out.transpose([1, 0, 2]).reshape([-1, self.heads * self.head_dim]) * F.sigmoid(gate)
        return self.o_proj(out), None


def _l2_normalize(x: paddle.Tensor) -> paddle.Tensor:
    return x * paddle.rsqrt((x * x).sum(-1, keepdim=True) + L2_EPS)


class GatedDeltaNet(nn.Layer):
    """`linear_attn` over a whole sequence from a zero state (the smoke test's teacher-forced pass)."""

    def __init__(self, dims: Qwen3_5Dims) -> None:
        super().__init__()
        self.k_heads, self.v_heads, self.k_dim, self.v_dim = dims.k_heads, dims.v_heads, dims.k_dim, dims.v_dim
        self.act = ACTIVATIONS[dims.act]
        channels = 2 * dims.k_heads * dims.k_dim + dims.v_heads * dims.v_dim
        self.in_proj_qkv = linear(dims.hidden, channels, bias=False)
        self.in_proj_z = linear(dims.hidden, dims.v_heads * dims.v_dim, bias=False)
        self.in_proj_b = linear(dims.hidden, dims.v_heads, bias=False)
        self.in_proj_a = linear(dims.hidden, dims.v_heads, bias=False)
        self.conv1d = nn.Conv1D(channels, channels, dims.conv_kernel, groups=channels, bias_attr=False)
        self.dt_bias = self.create_parameter([dims.v_heads])
        self.A_log = self.create_parameter([dims.v_heads])
        self.norm = RMSNorm(dims.v_dim, dims.eps)
        self.out_proj = linear(dims.v_heads * dims.v_dim, dims.hidden, bias=False)

    def _convolved(self, x: paddle.Tensor) -> paddle.Tensor:
        """The causal depthwise convolution, then `hidden_act`: tap j multiplies the input K - 1 - j steps back."""
        weight = as_float32(self.conv1d.weight)[:, 0, :]  # [C, K]
        kernel, length = weight.shape[1], x.shape[0]
        padded = paddle.concat([paddle.zeros([kernel - 1, x.shape[1]], "float32"), x])
        return self.act(sum(padded[j:j + length] * weight[:, j] for j in range(kernel)))

    def forward(self, x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor, mask: paddle.Tensor | None,
                past: Cache | None = None) -> tuple[paddle.Tensor, None]:
        length, key_width = x.shape[0], self.k_heads * self.k_dim
        mixed = self._convolved(self.in_proj_qkv(x))
        repeat = self.v_heads // self.k_heads
        q = paddle.repeat_interleave(_l2_normalize(mixed[:, :key_width].reshape([length, self.k_heads, self.k_dim])),
                                     repeat, axis=1) * (self.k_dim ** -0.5)
        key = mixed[:, key_width:2 * key_width].reshape([length, self.k_heads, self.k_dim])
        k = paddle.repeat_interleave(_l2_normalize(key), repeat, axis=1)
        v = mixed[:, 2 * key_width:].reshape([length, self.v_heads, self.v_dim])
        beta = F.sigmoid(self.in_proj_b(x))
        step = F.softplus(self.in_proj_a(x) + as_float32(self.dt_bias))
        decay = paddle.exp(-paddle.exp(as_float32(self.A_log)) * step)
        state = paddle.zeros([self.v_heads, self.k_dim, self.v_dim], "float32")
        outputs = []
        for t in range(length):  # S <- S exp(g); S += k (beta (v - S^T k))^T; o = S^T q
            state = state * decay[t].reshape([-1, 1, 1])
            remembered = (state * k[t].unsqueeze(-1)).sum(1)
            delta = (v[t] - remembered) * beta[t].unsqueeze(-1)
            state = state + k[t].unsqueeze(-1) * delta.unsqueeze(1)
            outputs.append((state * q[t].unsqueeze(-1)).sum(1))
        out = self.norm(paddle.stack(outputs)) * F.silu(self.in_proj_z(x).reshape([length, self.v_heads, self.v_dim]))
        return self.out_proj(out.reshape([length, self.v_heads * self.v_dim])), None


class SparseMoeBlock(RoutedExperts):
    """`mlp` of an MoE layer: the routed experts (stored [E, gate | up, H] and [E, H, Ie]) plus the shared expert
    times sigmoid(shared_expert_gate)."""

    def __init__(self, dims: Qwen3_5Dims, *, on_demand: bool = False) -> None:
        super().__init__(dims.hidden, dims.experts, dims.experts_per_token, dims.moe_inner, transposed=True,
                         on_demand=on_demand, act=ACTIVATIONS[dims.act])
        self.shared_expert = GatedMLP(dims.hidden, dims.shared_inner, bias=False, act=ACTIVATIONS[dims.act])
        self.shared_expert_gate = linear(dims.hidden, 1, bias=False)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return super().forward(x) + F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


def _mlp(dims: Qwen3_5Dims, *, on_demand: bool = False) -> nn.Layer:
    if dims.moe:
        return SparseMoeBlock(dims, on_demand=on_demand)
    return GatedMLP(dims.hidden, dims.inner, bias=False, act=ACTIVATIONS[dims.act])


class DecoderLayer(PreNormLayer):
    """Decoder layer `index` (`model.language_model.layers.N`): `linear_attn` or `self_attn` as layer_types says."""

    def __init__(self, dims: Qwen3_5Dims, index: int) -> None:
        super().__init__()
        if index in dims.full_layers:
            self.self_attn = GatedAttention(dims)
        else:
            self.linear_attn = GatedDeltaNet(dims)
        self.mlp = _mlp(dims)
        self.input_layernorm = ZeroCenteredRMSNorm(dims.hidden, dims.eps)
        self.post_attention_layernorm = ZeroCenteredRMSNorm(dims.hidden, dims.eps)

    def parts(self) -> tuple[nn.Layer, nn.Layer, nn.Layer, nn.Layer]:
        mixer = self.self_attn if hasattr(self, "self_attn") else self.linear_attn
        return self.input_layernorm, mixer, self.post_attention_layernorm, self.mlp


class MixerOnDemand(OnDemand):
    """The token mixer of a streamed layer: the layer's `linear_attn` or `self_attn`, whichever the checkpoint holds
    for it, built in its stored dtype and filled when the layer runs."""

    def __init__(self, dims: Qwen3_5Dims) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor, mask: paddle.Tensor | None,
                past: Cache | None = None) -> tuple[paddle.Tensor, None]:
        assert self.weights is not None  # attached by the fill of its layer
        layer = self.prefix.removesuffix("mixer.")
        kind, make = (("linear_attn.", GatedDeltaNet) if layer + "linear_attn.A_log" in self.weights.names
                      else ("self_attn.", GatedAttention))
        mixer = built_in(self.weights.stored_dtype(layer + kind), lambda: make(self.dims))
        return self.weights.fill(mixer, layer + kind)(x, cos, sin, mask, past)


class StreamedDecoderLayer(PreNormLayer):
    """A decoder layer every layer's weights fill in turn: norms and MLP filled, the mixer read as it runs."""

    def __init__(self, dims: Qwen3_5Dims) -> None:
        super().__init__()
        self.mixer = MixerOnDemand(dims)
        self.mlp = _mlp(dims, on_demand=True)
        self.input_layernorm = ZeroCenteredRMSNorm(dims.hidden, dims.eps)
        self.post_attention_layernorm = ZeroCenteredRMSNorm(dims.hidden, dims.eps)

    def parts(self) -> tuple[nn.Layer, nn.Layer, nn.Layer, nn.Layer]:
        return self.input_layernorm, self.mixer, self.post_attention_layernorm, self.mlp


class TextModelQwen3_5(TextModel):
    """`model.language_model`: token embedding (resident only), decoder layers, final norm."""

    embedding_key, layers_key = "embed_tokens.weight", "layers"

    def __init__(self, dims: Qwen3_5Dims, layers: int, *, embedding: bool) -> None:
        super().__init__()
        if embedding:
            self.embed_tokens = nn.Embedding(dims.vocab, dims.hidden)
        self.layers = nn.LayerList([DecoderLayer(dims, index) for index in range(layers)])
        self.norm = ZeroCenteredRMSNorm(dims.hidden, dims.eps)
        self.rotary = MRope(dims.rotary_dim, dims.rope_theta, dims.mrope_section, interleaved=True)

    def final_norm(self, h: paddle.Tensor) -> paddle.Tensor:
        return self.norm(h)

    def stream_layer(self, dims: object) -> nn.Layer:
        return StreamedDecoderLayer(dims)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# The family


class Network(TableVisionNetwork):
    dims_class, text_class = Qwen3_5Dims, TextModelQwen3_5
