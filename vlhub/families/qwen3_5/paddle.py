"""Qwen3.5's Paddle network, dense and MoE, under PaddleFormers' names: the Hugging Face names it loads as they are
(`model.visual.*`, `model.language_model.*`, `lm_head.weight`), its Linear weights Paddle's [in, out], transposed from
the stored torch [out, in] as they load; everything else (the experts [E, gate | up, H] and [E, H, Ie], norms, the
convolution [C, 1, K], A_log, dt_bias, embeddings, patch and position tables) as stored (`[paddle]` in family.toml).

Vision (`model.visual`): Qwen3-VL's tower without DeepStack (16-pixel patches, the learned position table resampled
through the input's four taps per patch, LayerNorm blocks attending within each frame under the 2-D rotary, the
merger). Text (`model.language_model`): each decoder layer as `text_config.layer_types` says, a Gated DeltaNet
(`linear_attn`: causal depthwise convolution, L2-normalised q and k, the gated delta rule token by token, a plain
RMSNorm times silu(z)) or gated full attention (`self_attn`: [q_h | gate_h] per head, `1 + w` q/k norms, partial
interleaved M-RoPE, output times sigmoid(gate)); `1 + w` RMSNorms around them; a SwiGLU MLP or (MoE) routed experts
of which only the routed ones are computed, plus the shared expert scaled by sigmoid(shared_expert_gate).

Streamed, the token mixer of each layer is read when the layer runs (`MixerOnDemand`: the kind whose tensors the
checkpoint holds for that layer), so one layer class serves both kinds. The recurrence and the routing run in
dygraph; there is no static graph of this network (`--to paddle-inference` refuses the family). Equal to the numpy
reference (`reference.py`) and so to transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from vlhub.convert.configs import official_config
from vlhub.errors import UserError
from vlhub.families.qwen3_5.reference import DEFAULT_MROPE_SECTION, DEFAULT_ROPE_THETA, rope_settings, rotary_width
from vlhub.keymaps import keymap_of_config
from vlhub.smoke.paddle_forward import (
    Cache,
    GatedMLP,
    LayerNorm,
    OnDemand,
    PaddleFamily,
    PreNormLayer,
    RMSNorm,
    StreamedWeights,
    TextModel,
    as_float32,
    attention,
    built_in,
    causal_mask,
    float_tensor,
    int_tensor,
    linear,
    merge_image_embeds,
    rotate,
)
from vlhub.smoke.paddle_mrope import VISION_EPS, MRope, VisionAttention, VisionRotary

VISION = "model.visual."
L2_EPS = 1e-6
ACTIVATIONS: dict[str, Callable[[paddle.Tensor], paddle.Tensor]] = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate=True), "gelu_new": lambda x: F.gelu(x, approximate=True),
    "gelu": F.gelu, "quick_gelu": lambda x: x * F.sigmoid(1.702 * x), "silu": F.silu,
}


@dataclass(frozen=True)
class Qwen3_5Dims:
    """What the network needs from config.json: the key map's dims (as the conversion reads them) and the fields
    that shape no tensor."""

    hidden: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    full_layers: tuple[int, ...]
    inner: int
    tied: bool
    positions: int
    moe: bool
    experts: int
    experts_per_token: int
    moe_inner: int
    shared_inner: int
    k_heads: int
    v_heads: int
    k_dim: int
    v_dim: int
    conv_kernel: int
    eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    rotary_dim: int
    v_width: int
    v_heads_vision: int
    v_inner: int
    v_depth: int
    v_out: int
    v_positions: int
    in_chans: int
    patch: int
    temporal_patch: int
    merge: int
    v_act: str

    @classmethod
    def from_config(cls, config: dict) -> Qwen3_5Dims:
        keymap = keymap_of_config(config)
        assert keymap is not None  # family_network found the family by this config
        d = keymap.resolve_dims(config)
        flat = official_config(config)
        vision = flat.get("vision_config") or {}
        rope = rope_settings(config)
        rotary_dim = rotary_width(d["head_dim"], rope)
        section = tuple(int(n) for n in rope.get("mrope_section", DEFAULT_MROPE_SECTION))
        if len(section) != 3 or sum(section) * 2 != rotary_dim:
            raise UserError(f"mrope_section {list(section)} does not cover the rotated {rotary_dim} of head_dim "
                            f"{d['head_dim']} / 2")
        act = vision.get("hidden_act", "gelu_pytorch_tanh")
        if not isinstance(act, str) or act not in ACTIVATIONS:
            raise UserError(f"config.json vision_config.hidden_act is {act!r}; the network knows "
                            f"{', '.join(ACTIVATIONS)}")
        return cls(
            hidden=d["hidden"], vocab=d["vocab"], heads=d["heads"], kv_heads=d["kv_heads"], head_dim=d["head_dim"],
            layers=d["layers"], full_layers=d["full_layers"], inner=d["inter"], tied=bool(d["tied"]),
            positions=d["positions"], moe=bool(d["moe"]), experts=d["experts"],
            experts_per_token=d["experts_per_token"],
            moe_inner=d["moe_inter"], shared_inner=d["shared_inter"], k_heads=d["lin_k_heads"],
            v_heads=d["lin_v_heads"], k_dim=d["lin_k_dim"], v_dim=d["lin_v_dim"], conv_kernel=d["conv_kernel"],
            eps=float(flat.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", DEFAULT_ROPE_THETA)),
            mrope_section=section, rotary_dim=rotary_dim,  # type: ignore[arg-type]
            v_width=d["v_width"], v_heads_vision=d["v_heads"], v_inner=d["v_inter"], v_depth=d["v_depth"],
            v_out=d["v_out"], v_positions=d["v_positions"], in_chans=d["v_in_chans"], patch=d["v_patch"],
            temporal_patch=d["v_temporal"], merge=d["v_merge"], v_act=act,
        )  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# Vision


class PatchEmbed(nn.Layer):
    """The Conv3d over (C, T, P, P) patches with its bias, computed as the matmul it is (its kernel is its stride)."""

    def __init__(self, dims: Qwen3_5Dims) -> None:
        super().__init__()
        kernel = [dims.temporal_patch, dims.patch, dims.patch]
        self.proj = nn.Conv3D(dims.in_chans, dims.v_width, kernel, stride=kernel)

    def forward(self, pixel_values: paddle.Tensor) -> paddle.Tensor:
        weight = as_float32(self.proj.weight)
        return paddle.matmul(pixel_values, weight.reshape([weight.shape[0], -1]), transpose_y=True) + \
            as_float32(self.proj.bias)


class VisionBlock(nn.Layer):
    """LayerNorm, attention within `mask`, LayerNorm, `linear_fc2(act(linear_fc1))`; each added back."""

    def __init__(self, dims: Qwen3_5Dims) -> None:
        super().__init__()
        self.norm1, self.norm2 = LayerNorm(dims.v_width, VISION_EPS), LayerNorm(dims.v_width, VISION_EPS)
        self.attn = VisionAttention(dims.v_width, dims.v_heads_vision)
        self.mlp = nn.Layer()
        self.mlp.linear_fc1 = linear(dims.v_width, dims.v_inner)
        self.mlp.linear_fc2 = linear(dims.v_inner, dims.v_width)
        self.act = ACTIVATIONS[dims.v_act]

    def forward(self, x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor, mask: paddle.Tensor) -> paddle.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp.linear_fc2(self.act(self.mlp.linear_fc1(self.norm2(x))))


class VisionTower(nn.Layer):
    """`model.visual`: patch embedding and position table, `depth` blocks (0 when streamed: they are run one at a
    time), and the merger (LayerNorm per patch, 2x2 groups, fc1, exact GELU, fc2)."""

    def __init__(self, dims: Qwen3_5Dims, depth: int) -> None:
        super().__init__()
        self.merged = dims.v_width * dims.merge**2
        self.patch_embed = PatchEmbed(dims)
        self.pos_embed = nn.Embedding(dims.v_positions, dims.v_width)
        self.rotary = VisionRotary(dims.v_width // dims.v_heads_vision)
        self.blocks = nn.LayerList([VisionBlock(dims) for _ in range(depth)])
        self.merger = nn.Layer()
        self.merger.norm = LayerNorm(dims.v_width, VISION_EPS)
        self.merger.linear_fc1 = linear(self.merged, self.merged)
        self.merger.linear_fc2 = linear(self.merged, dims.v_out)

    def embed(self, pixel_values: paddle.Tensor, positions: paddle.Tensor, interp_indices: paddle.Tensor,
              interp_weights: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
        """Patch vectors with their resampled position embeddings, and the rotary cos/sin."""
        table = as_float32(self.pos_embed.weight)
        taps = paddle.gather(table, interp_indices.reshape([-1])).reshape([-1, 4, table.shape[-1]])
        x = self.patch_embed(pixel_values) + (taps * interp_weights.unsqueeze(-1)).sum(1)
        cos, sin = self.rotary(positions)
        return x, cos, sin

    def merge(self, x: paddle.Tensor) -> paddle.Tensor:
        h = self.merger.norm(x).reshape([-1, self.merged])
        return self.merger.linear_fc2(F.gelu(self.merger.linear_fc1(h)))

    def forward(self, pixel_values: paddle.Tensor, vision_position_ids: paddle.Tensor, full_mask: paddle.Tensor,
                interp_indices: paddle.Tensor, interp_weights: paddle.Tensor) -> paddle.Tensor:
        x, cos, sin = self.embed(pixel_values, vision_position_ids, interp_indices, interp_weights)
        for block in self.blocks:
            x = block(x, cos, sin, full_mask)
        return self.merge(x)


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
        """The causal depthwise convolution, then SiLU: tap j multiplies the input K - 1 - j steps back."""
        weight = as_float32(self.conv1d.weight)[:, 0, :]  # [C, K]
        kernel, length = weight.shape[1], x.shape[0]
        padded = paddle.concat([paddle.zeros([kernel - 1, x.shape[1]], "float32"), x])
        return F.silu(sum(padded[j:j + length] * weight[:, j] for j in range(kernel)))

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


class FusedExperts(nn.Layer):
    """`mlp.experts`: gate_up_proj [E, gate | up, H] and down_proj [E, H, Ie], as stored."""

    def __init__(self, dims: Qwen3_5Dims) -> None:
        super().__init__()
        self.gate_up_proj = self.create_parameter([dims.experts, 2 * dims.moe_inner, dims.hidden])
        self.down_proj = self.create_parameter([dims.experts, dims.hidden, dims.moe_inner])

    def expert(self, index: int) -> tuple[paddle.Tensor, paddle.Tensor]:
        """Expert `index`'s [2Ie, H] and [H, Ie]."""
        return as_float32(self.gate_up_proj[index]), as_float32(self.down_proj[index])


class ExpertsOnDemand(OnDemand):
    """`mlp.experts` of a streamed layer: each expert's slices of the stacked tensors read when it is routed to."""

    def expert(self, index: int) -> tuple[paddle.Tensor, paddle.Tensor]:
        ids = np.array([index])
        return self.slices("gate_up_proj", ids)[0], self.slices("down_proj", ids)[0]


class SparseMoeBlock(nn.Layer):
    """`mlp` of an MoE layer: router softmax over the experts, top-k, renormalised; the SwiGLU of each expert some
    token is routed to, on those tokens; plus the shared expert times sigmoid(shared_expert_gate)."""

    def __init__(self, dims: Qwen3_5Dims, *, on_demand: bool = False) -> None:
        super().__init__()
        self.top_k, self.inner = dims.experts_per_token, dims.moe_inner
        self.gate = linear(dims.hidden, dims.experts, bias=False)
        self.experts = ExpertsOnDemand() if on_demand else FusedExperts(dims)
        self.shared_expert = GatedMLP(dims.hidden, dims.shared_inner, bias=False)
        self.shared_expert_gate = linear(dims.hidden, 1, bias=False)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        weights, chosen = paddle.topk(F.softmax(self.gate(x), axis=-1), self.top_k, axis=-1)
        weights = (weights / weights.sum(axis=-1, keepdim=True)).numpy()
        chosen = chosen.numpy()
        out = paddle.zeros_like(x)
        for expert in np.unique(chosen):  # only the experts some token is routed to, one at a time
            tokens, rank = np.nonzero(chosen == expert)
            rows = paddle.to_tensor(tokens)
            gate_up, down = self.experts.expert(int(expert))
            fused = paddle.matmul(paddle.gather(x, rows), gate_up, transpose_y=True)
            hidden = F.silu(fused[:, :self.inner]) * fused[:, self.inner:]
            scale = paddle.to_tensor(weights[tokens, rank][:, None])
            out = paddle.index_add(out, rows, 0, paddle.matmul(hidden, down, transpose_y=True) * scale)
        return out + F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


def _mlp(dims: Qwen3_5Dims, *, on_demand: bool = False) -> nn.Layer:
    return SparseMoeBlock(dims, on_demand=on_demand) if dims.moe else GatedMLP(dims.hidden, dims.inner, bias=False)


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

    def prepare(self, h: paddle.Tensor, position_ids: paddle.Tensor, image_embeds: paddle.Tensor,
                image_mask: paddle.Tensor) -> tuple[paddle.Tensor, ...]:
        cos, sin = self.rotary(position_ids)
        return merge_image_embeds(h, image_embeds, image_mask), cos, sin, causal_mask(h)


class Qwen3_5Net(nn.Layer):
    """The whole model with PaddleFormers' (Hugging Face's) children `model` (`visual`, `language_model`) and,
    untied, `lm_head`."""

    def __init__(self, dims: Qwen3_5Dims) -> None:
        super().__init__()
        self.tied = dims.tied
        self.model = nn.Layer()
        self.model.visual = VisionTower(dims, dims.v_depth)
        self.model.language_model = TextModelQwen3_5(dims, dims.layers, embedding=True)
        if not dims.tied:
            self.lm_head = linear(dims.hidden, dims.vocab, bias=False)

    def forward(self, input_ids: paddle.Tensor, position_ids: paddle.Tensor, image_embeds: paddle.Tensor,
                image_mask: paddle.Tensor) -> paddle.Tensor:
        text = self.model.language_model
        h = text(input_ids, position_ids, image_embeds, image_mask)
        if self.tied:
            return paddle.matmul(h, as_float32(text.embed_tokens.weight), transpose_y=True)
        return self.lm_head(h)


# ---------------------------------------------------------------------------------------------------
# The family


_VISION_INPUTS = ("vision_position_ids", "full_mask", "interp_indices", "interp_weights")


class Network(PaddleFamily):
    text_prefix = "model.language_model."
    positions_rows = 3

    def __init__(self, config: dict) -> None:
        self.dims = dims = Qwen3_5Dims.from_config(config)
        self.hidden, self.vocab, self.layers = dims.hidden, dims.vocab, dims.layers
        self.heads, self.kv_heads, self.tied, self.position_limit = dims.heads, dims.kv_heads, dims.tied, dims.positions

    def build(self) -> nn.Layer:
        return Qwen3_5Net(self.dims)

    def vision(self, net: nn.Layer) -> nn.Layer:
        return net.model.visual

    @property
    def head_dim(self) -> int:
        return self.dims.head_dim

    def vision_tensors(self, pixel_values: np.ndarray, vision_inputs: dict[str, np.ndarray]) -> list[paddle.Tensor]:
        dims = self.dims
        if set(vision_inputs) != set(_VISION_INPUTS):
            raise ValueError(f"the vision tower takes {', '.join(_VISION_INPUTS)}; given {', '.join(vision_inputs)}")
        patches, width = len(pixel_values), dims.in_chans * dims.temporal_patch * dims.patch**2
        if pixel_values.shape != (patches, width) or patches % dims.merge**2:
            raise ValueError(f"pixel_values is {list(pixel_values.shape)}; expected [N, {width}], N a multiple of "
                             f"{dims.merge**2}")
        positions, full_mask, indices, weights = (vision_inputs[name] for name in _VISION_INPUTS)
        if (positions.shape, full_mask.shape, indices.shape, weights.shape) != \
                ((patches, 2), (patches, patches), (patches, 4), (patches, 4)):
            raise ValueError(f"vision_position_ids must be [{patches}, 2], full_mask [{patches}, {patches}], "
                             f"interp_indices and interp_weights [{patches}, 4]")
        if indices.size and (indices.min() < 0 or indices.max() >= dims.v_positions):
            raise ValueError(f"interp_indices must lie in [0, {dims.v_positions})")
        return [float_tensor(pixel_values), int_tensor(positions), float_tensor(full_mask), int_tensor(indices),
                float_tensor(weights)]

    def stream_vision(self, weights: StreamedWeights, tensors: list[paddle.Tensor]) -> paddle.Tensor:
        pixel_values, positions, full_mask, indices, interp = tensors
        tower = weights.fill(VisionTower(self.dims, 0), VISION)
        block = VisionBlock(self.dims)
        x, cos, sin = tower.embed(pixel_values, positions, indices, interp)
        for i in range(self.dims.v_depth):
            x = weights.fill(block, f"{VISION}blocks.{i}.")(x, cos, sin, full_mask)
        return tower.merge(x)

    def text_model(self, net: nn.Layer | None = None) -> TextModel:
        return net.model.language_model if net is not None else TextModelQwen3_5(self.dims, 0, embedding=False)

    def head(self, net: nn.Layer) -> paddle.Tensor:
        return net.model.language_model.embed_tokens.weight if self.tied else net.lm_head.weight
