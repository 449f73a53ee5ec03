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
positions.

Text (`model.language_model`): pre-norm decoder layers with per-head RMSNorm on q and k before the rotary, no
biases, `head_dim` of its own, interleaved multimodal rotary; a SwiGLU MLP, or (MoE, every layer) a router softmax,
top-k, renormalised, over SwiGLU experts of which only the routed ones are computed, and (streamed) read one
expert's slice at a time. The routing picks experts by value, so the MoE network runs in dygraph only; the dense one
(vision and text) traces whole with `paddle.jit.to_static`. Equal to the numpy reference (`reference.py`) and so to
transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn
from paddle.static import InputSpec

from vlhub.convert.configs import official_config
from vlhub.errors import UserError
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
    causal_mask,
    extend,
    float_tensor,
    int_tensor,
    linear,
    merge_image_embeds,
    rotate,
)
from vlhub.smoke.paddle_mrope import VISION_EPS, MRope, VisionAttention, VisionRotary

VISION = "model.visual."
# transformers' defaults for what a config.json may leave out (as reference.py)
DEFAULT_MROPE_SECTION = (24, 20, 20)
DEFAULT_ROPE_THETA = 500000.0


def _quick_gelu(x: paddle.Tensor) -> paddle.Tensor:
    return x * F.sigmoid(1.702 * x)


# the vision MLP's activation by config.json `hidden_act` (transformers' ACT2FN names, as reference.py)
ACTIVATIONS: dict[str, Callable[[paddle.Tensor], paddle.Tensor]] = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate=True), "gelu_new": lambda x: F.gelu(x, approximate=True),
    "gelu": F.gelu, "quick_gelu": _quick_gelu, "silu": F.silu,
}


@dataclass(frozen=True)
class Qwen3VLDims:
    """What the network needs from config.json: the key map's dims (as the conversion reads them) and the fields
    that shape no tensor."""

    hidden: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    inner: int
    tied: bool
    positions: int
    moe: bool
    experts: int
    experts_per_token: int
    moe_inner: int
    eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    v_width: int
    v_heads: int
    v_inner: int
    v_depth: int
    v_out: int
    v_positions: int
    in_chans: int
    patch: int
    temporal_patch: int
    merge: int
    v_act: str
    deepstack_mergers: int
    # (vision block, DeepStack merger) in block order: what feature j is made from
    deepstack: tuple[tuple[int, int], ...]

    @classmethod
    def from_config(cls, config: dict) -> Qwen3VLDims:
        keymap = keymap_of_config(config)
        assert keymap is not None  # family_network found the family by this config
        d = keymap.resolve_dims(config)
        flat = official_config(config)
        vision = flat.get("vision_config") or {}
        rope = next((value for key in ("rope_parameters", "rope_scaling")
                     if isinstance(value := flat.get(key), dict) and "mrope_section" in value), {})
        section = tuple(int(n) for n in rope.get("mrope_section", DEFAULT_MROPE_SECTION))
        if len(section) != 3 or sum(section) * 2 != d["head_dim"]:
            raise UserError(f"mrope_section {list(section)} does not cover head_dim {d['head_dim']} / 2")
        act = vision.get("hidden_act", "gelu_pytorch_tanh")
        if not isinstance(act, str) or act not in ACTIVATIONS:
            raise UserError(f"config.json vision_config.hidden_act is {act!r}; the network knows "
                            f"{', '.join(ACTIVATIONS)}")
        listed = list(vision.get("deepstack_visual_indexes") or [])
        return cls(
            hidden=d["hidden"], vocab=d["vocab"], heads=d["heads"], kv_heads=d["kv_heads"], head_dim=d["head_dim"],
            layers=d["layers"], inner=d["inter"], tied=bool(d["tied"]), positions=d["positions"], moe=bool(d["moe"]),
            experts=d["experts"], experts_per_token=d["experts_per_token"], moe_inner=d["moe_inter"],
            eps=float(flat.get("rms_norm_eps", 1e-6)),
            rope_theta=float(flat.get("rope_theta", rope.get("rope_theta", DEFAULT_ROPE_THETA))),
            mrope_section=section,  # type: ignore[arg-type]
            v_width=d["v_width"], v_heads=d["v_heads"], v_inner=d["v_inter"], v_depth=d["v_depth"], v_out=d["v_out"],
            v_positions=d["v_positions"], in_chans=d["v_in_chans"], patch=d["v_patch"],
            temporal_patch=d["v_temporal"], merge=d["v_merge"], v_act=act, deepstack_mergers=d["deepstack"],
            # as transformers: in block order, each block by its first place in the list
            deepstack=tuple((block, listed.index(block)) for block in range(d["v_depth"]) if block in listed),
        )

    @property
    def features(self) -> int:
        """Image embeddings per image token: the main merger's and one per DeepStack block."""
        return 1 + len(self.deepstack)


# ---------------------------------------------------------------------------------------------------
# Vision


class PatchEmbed(nn.Layer):
    """The Conv3d over (C, T, P, P) patches with its bias, computed as the matmul it is (its kernel is its stride)."""

    def __init__(self, dims: Qwen3VLDims) -> None:
        super().__init__()
        kernel = [dims.temporal_patch, dims.patch, dims.patch]
        self.proj = nn.Conv3D(dims.in_chans, dims.v_width, kernel, stride=kernel)

    def forward(self, pixel_values: paddle.Tensor) -> paddle.Tensor:
        weight = as_float32(self.proj.weight)
        return paddle.matmul(pixel_values, weight.reshape([weight.shape[0], -1]), transpose_y=True) + \
            as_float32(self.proj.bias)


class VisionMLP(nn.Layer):
    """linear_fc2(act(linear_fc1(x))), with biases."""

    def __init__(self, dims: Qwen3VLDims) -> None:
        super().__init__()
        self.act = ACTIVATIONS[dims.v_act]
        self.linear_fc1 = linear(dims.v_width, dims.v_inner)
        self.linear_fc2 = linear(dims.v_inner, dims.v_width)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Layer):
    """One vision block: LayerNorm, attention within `mask`, LayerNorm, MLP; each added back."""

    def __init__(self, dims: Qwen3VLDims) -> None:
        super().__init__()
        self.norm1, self.norm2 = LayerNorm(dims.v_width, VISION_EPS), LayerNorm(dims.v_width, VISION_EPS)
        self.attn = VisionAttention(dims.v_width, dims.v_heads)
        self.mlp = VisionMLP(dims)

    def forward(self, x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor, mask: paddle.Tensor) -> paddle.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Layer):
    """Each 2x2 group of patches as one row, normalised per patch before grouping (the main merger) or over the
    group after it (DeepStack's), then linear_fc1, exact GELU, linear_fc2."""

    def __init__(self, dims: Qwen3VLDims, *, after_grouping: bool) -> None:
        super().__init__()
        self.merged = dims.v_width * dims.merge**2
        self.after_grouping = after_grouping
        self.norm = LayerNorm(self.merged if after_grouping else dims.v_width, VISION_EPS)
        self.linear_fc1 = linear(self.merged, self.merged)
        self.linear_fc2 = linear(self.merged, dims.v_out)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = self.norm(x.reshape([-1, self.merged])) if self.after_grouping else \
            self.norm(x).reshape([-1, self.merged])
        return self.linear_fc2(F.gelu(self.linear_fc1(h)))


class VisionTower(nn.Layer):
    """`model.visual`: patch embedding and position table, `depth` blocks (0 when streamed: they are run one at a
    time), the merger and the DeepStack mergers."""

    def __init__(self, dims: Qwen3VLDims, depth: int) -> None:
        super().__init__()
        self.dims = dims
        self.patch_embed = PatchEmbed(dims)
        self.pos_embed = nn.Embedding(dims.v_positions, dims.v_width)
        self.rotary = VisionRotary(dims.v_width // dims.v_heads)
        self.blocks = nn.LayerList([VisionBlock(dims) for _ in range(depth)])
        self.merger = PatchMerger(dims, after_grouping=False)
        self.deepstack_merger_list = nn.LayerList(
            [PatchMerger(dims, after_grouping=True) for _ in range(dims.deepstack_mergers)])

    def embed(self, pixel_values: paddle.Tensor, positions: paddle.Tensor, interp_indices: paddle.Tensor,
              interp_weights: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
        """Patch vectors with their resampled position embeddings, and the rotary cos/sin."""
        table = as_float32(self.pos_embed.weight)
        taps = paddle.gather(table, interp_indices.reshape([-1])).reshape([-1, 4, table.shape[-1]])
        x = self.patch_embed(pixel_values) + (taps * interp_weights.unsqueeze(-1)).sum(1)
        cos, sin = self.rotary(positions)
        return x, cos, sin

    def features(self, block: int, x: paddle.Tensor) -> list[paddle.Tensor]:
        """After vision block `block`: its DeepStack feature, if it is a DeepStack block (a new list, so tracing
        for a static graph sees no list grow in place)."""
        return [self.deepstack_merger_list[merger](x) for listed, merger in self.dims.deepstack if listed == block]

    def forward(self, pixel_values: paddle.Tensor, vision_position_ids: paddle.Tensor, full_mask: paddle.Tensor,
                interp_indices: paddle.Tensor, interp_weights: paddle.Tensor) -> paddle.Tensor:
        x, cos, sin = self.embed(pixel_values, vision_position_ids, interp_indices, interp_weights)
        found: list[paddle.Tensor] = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, full_mask)
            found = found + self.features(i, x)
        return paddle.stack([self.merger(x), *found])


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


class FusedExperts(nn.Layer):
    """`mlp.experts`: every expert's weights in two stacked tensors, as stored: gate_up_proj [E, H, 2Ie] (gate the
    first Ie columns, then up) and down_proj [E, Ie, H]."""

    def __init__(self, dims: Qwen3VLDims) -> None:
        super().__init__()
        self.gate_up_proj = self.create_parameter([dims.experts, dims.hidden, 2 * dims.moe_inner])
        self.down_proj = self.create_parameter([dims.experts, dims.moe_inner, dims.hidden])

    def expert(self, index: int) -> tuple[paddle.Tensor, paddle.Tensor]:
        """Expert `index`'s [H, 2Ie] and [Ie, H]."""
        return as_float32(self.gate_up_proj[index]), as_float32(self.down_proj[index])


class ExpertsOnDemand(OnDemand):
    """`mlp.experts` of a streamed layer: each expert's slices of the stacked tensors read when it is routed to."""

    def expert(self, index: int) -> tuple[paddle.Tensor, paddle.Tensor]:
        ids = np.array([index])
        return self.slices("gate_up_proj", ids)[0], self.slices("down_proj", ids)[0]


class SparseMoeBlock(nn.Layer):
    """`mlp` of an MoE layer: router softmax (float32) over the experts, top-k, renormalised; the SwiGLU of each
    expert some token is routed to, on those tokens, weighted and summed."""

    def __init__(self, dims: Qwen3VLDims, *, on_demand: bool = False) -> None:
        super().__init__()
        self.top_k, self.inner = dims.experts_per_token, dims.moe_inner
        self.gate = linear(dims.hidden, dims.experts, bias=False)
        self.experts = ExpertsOnDemand() if on_demand else FusedExperts(dims)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        probs = F.softmax(self.gate(x), axis=-1)
        weights, chosen = paddle.topk(probs, self.top_k, axis=-1)
        weights = (weights / weights.sum(axis=-1, keepdim=True)).numpy()
        chosen = chosen.numpy()
        out = paddle.zeros_like(x)
        for expert in np.unique(chosen):  # only the experts some token is routed to, one at a time
            tokens, rank = np.nonzero(chosen == expert)
            rows = paddle.to_tensor(tokens)
            gate_up, down = self.experts.expert(int(expert))
            fused = paddle.matmul(paddle.gather(x, rows), gate_up)
            hidden = F.silu(fused[:, :self.inner]) * fused[:, self.inner:]
            scale = paddle.to_tensor(weights[tokens, rank][:, None])
            out = paddle.index_add(out, rows, 0, paddle.matmul(hidden, down) * scale)
        return out


class DecoderLayer(PreNormLayer):
    """One decoder layer (`model.language_model.layers.N`): dense (SwiGLU) or, in an MoE model, sparse."""

    def __init__(self, dims: Qwen3VLDims, *, on_demand: bool = False) -> None:
        super().__init__()
        self.self_attn = Attention(dims)
        self.mlp = SparseMoeBlock(dims, on_demand=on_demand) if dims.moe else \
            GatedMLP(dims.hidden, dims.inner, bias=False)
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
        self.deepstack = len(dims.deepstack)
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


class LanguageVisionModel(nn.Layer):
    """`model`: `visual` and `language_model`."""

    def __init__(self, dims: Qwen3VLDims) -> None:
        super().__init__()
        self.visual = VisionTower(dims, dims.v_depth)
        self.language_model = TextModelQwen3(dims, dims.layers, embedding=True)


class Qwen3VLNet(nn.Layer):
    """The whole model with PaddleFormers' (Hugging Face's) children `model` and, untied, `lm_head`."""

    def __init__(self, dims: Qwen3VLDims) -> None:
        super().__init__()
        self.tied = dims.tied
        self.model = LanguageVisionModel(dims)
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
        self.dims = dims = Qwen3VLDims.from_config(config)
        self.hidden, self.vocab, self.layers = dims.hidden, dims.vocab, dims.layers
        self.heads, self.kv_heads, self.tied, self.position_limit = dims.heads, dims.kv_heads, dims.tied, dims.positions

    def build(self) -> nn.Layer:
        return Qwen3VLNet(self.dims)

    def vision(self, net: nn.Layer) -> nn.Layer:
        return net.model.visual

    def image_embeds_shape(self, marked: int) -> tuple[int, ...]:
        return (self.dims.features, marked, self.hidden)

    @property
    def head_dim(self) -> int:
        return self.dims.head_dim

    def vision_graph(self, net: nn.Layer) -> tuple[Callable, list]:
        dims = self.dims
        width = dims.in_chans * dims.temporal_patch * dims.patch**2
        return net.model.visual.forward, [
            InputSpec([None, width], "float32", "pixel_values"), InputSpec([None, 2], "int64", "vision_position_ids"),
            InputSpec([None, None], "float32", "full_mask"), InputSpec([None, 4], "int64", "interp_indices"),
            InputSpec([None, 4], "float32", "interp_weights")]

    def vision_tensors(self, pixel_values: np.ndarray, vision_inputs: dict[str, np.ndarray]) -> list[paddle.Tensor]:
        dims = self.dims
        if set(vision_inputs) != set(_VISION_INPUTS):
            raise ValueError(f"the vision tower takes {', '.join(_VISION_INPUTS)}; given {', '.join(vision_inputs)}")
        patches = len(pixel_values)
        width = dims.in_chans * dims.temporal_patch * dims.patch**2
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
        found: list[paddle.Tensor] = []
        for i in range(self.dims.v_depth):
            x = weights.fill(block, f"{VISION}blocks.{i}.")(x, cos, sin, full_mask)
            found = found + tower.features(i, x)
        return paddle.stack([tower.merger(x), *found])

    def text_model(self, net: nn.Layer | None = None) -> TextModel:
        return net.model.language_model if net is not None else TextModelQwen3(self.dims, 0, embedding=False)

    def head(self, net: nn.Layer) -> paddle.Tensor:
        return net.model.language_model.embed_tokens.weight if self.tied else net.lm_head.weight
