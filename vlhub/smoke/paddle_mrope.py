"""The Paddle network shared by the families whose processor cuts images into merged patches and whose text model
places them with multimodal rotary positions: a vision tower of patch blocks (LayerNorm or RMSNorm, a QuickGELU or
SwiGLU MLP, optionally window attention) and merger, and a grouped-query decoder with M-RoPE sections. A family's
`paddle.py` reads its config.json into `MRopeDims` and subclasses `MRopeNetwork`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn
from paddle.static import InputSpec

from vlhub.convert.configs import official_config
from vlhub.errors import UserError
from vlhub.keymaps.config import tie_word_embeddings
from vlhub.smoke.paddle_forward import (
    Cache,
    GatedMLP,
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
    int_tensor,
    inverse_frequencies,
    linear,
    rotate,
)

VISION_EPS = 1e-6


@dataclass(frozen=True)
class MRopeDims:
    """What the network needs from config.json: the text model's sizes and the vision tower's."""

    v_width: int
    v_heads: int
    v_inner: int
    v_depth: int
    v_out: int
    in_chans: int
    patch: int
    temporal_patch: int
    merge: int
    rms_vision: bool  # RMSNorm in the vision blocks and merger (else LayerNorm)
    gated_vision_mlp: bool  # a SwiGLU vision MLP (else QuickGELU)
    windowed: bool  # blocks outside `fullatt_blocks` attend within windows
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
    positions: int

    @classmethod
    def from_config(cls, config: dict, *, v_width: int, v_inner: int, v_out: int, rms_vision: bool,
                    gated_vision_mlp: bool, fullatt_blocks: tuple[int, ...] | None) -> MRopeDims:
        """The text sizes and the vision fields every such family names alike; the family gives the rest
        (`fullatt_blocks` None: every block attends across the whole image)."""
        flat = official_config(config)
        vision = flat.get("vision_config") or {}
        heads = flat["num_attention_heads"]
        dims = cls(
            v_width=v_width, v_heads=vision.get("num_heads", 16), v_inner=v_inner, v_depth=vision.get("depth", 32),
            v_out=v_out, in_chans=vision.get("in_chans", vision.get("in_channels", 3)),
            patch=vision.get("patch_size", 14), temporal_patch=vision.get("temporal_patch_size", 2),
            merge=vision.get("spatial_merge_size", 2), rms_vision=rms_vision, gated_vision_mlp=gated_vision_mlp,
            windowed=fullatt_blocks is not None, fullatt_blocks=fullatt_blocks or (),
            hidden=flat["hidden_size"], inner=flat["intermediate_size"], heads=heads,
            kv_heads=flat.get("num_key_value_heads", heads), layers=flat["num_hidden_layers"],
            vocab=flat["vocab_size"], eps=flat.get("rms_norm_eps", 1e-6), rope_theta=flat.get("rope_theta", 1e6),
            mrope_section=tuple((flat.get("rope_scaling") or {}).get("mrope_section", (16, 24, 24))),
            tied=tie_word_embeddings(flat), positions=flat.get("max_position_embeddings", 32768),
        )
        if sum(dims.mrope_section) * 2 != dims.hidden // heads:
            raise UserError(f"mrope_section {list(dims.mrope_section)} does not cover head_dim "
                            f"{dims.hidden // heads} / 2")
        return dims


def vision_norm(dims: MRopeDims) -> nn.Layer:
    return RMSNorm(dims.v_width, VISION_EPS) if dims.rms_vision else LayerNorm(dims.v_width, VISION_EPS)


class PatchEmbed(nn.Layer):
    """Conv3D over (C, T, P, P) patches: each patch row of pixel_values becomes one E-wide vector."""

    def __init__(self, dims: MRopeDims) -> None:
        super().__init__()
        self.shape = [-1, dims.in_chans, dims.temporal_patch, dims.patch, dims.patch]
        self.kernel = [dims.temporal_patch, dims.patch, dims.patch]
        self.proj = nn.Conv3D(dims.in_chans, dims.v_width, self.kernel, stride=self.kernel, bias_attr=False)

    def forward(self, pixel_values: paddle.Tensor) -> paddle.Tensor:
        patches = F.conv3d(pixel_values.reshape(self.shape), as_float32(self.proj.weight), stride=self.kernel)
        return patches.reshape([-1, self.proj.weight.shape[0]])


class VisionRotary(nn.Layer):
    """2-D rotary angles from (row, col) patch positions: [h freqs, w freqs] twice over head_dim."""

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.half = head_dim // 2
        self.register_buffer("inv_freq", inverse_frequencies(self.half, theta), persistable=False)

    def forward(self, positions: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        freqs = (positions.astype("float32").unsqueeze(-1) * self.inv_freq).reshape([-1, self.half])
        emb = paddle.concat([freqs, freqs], axis=-1)
        return paddle.cos(emb), paddle.sin(emb)


class VisionAttention(nn.Layer):
    """Fused qkv (output columns [all q; all k; all v]) with 2-D rotary, masked by segment."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.width, self.heads = width, heads
        self.qkv = linear(width, 3 * width)
        self.proj = linear(width, width)

    def forward(self, x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor, mask: paddle.Tensor) -> paddle.Tensor:
        qkv = self.qkv(x).reshape([-1, 3, self.heads, self.width // self.heads]).transpose([1, 2, 0, 3])
        q, k, v = qkv.unbind(0)
        out = attention(rotate(q, cos, sin), rotate(k, cos, sin), v, mask)
        return self.proj(out.transpose([1, 0, 2]).reshape([-1, self.width]))


class QuickGeluMLP(nn.Layer):
    """fc2(quick_gelu(fc1(x))): a vision MLP with biases."""

    def __init__(self, width: int, inner: int) -> None:
        super().__init__()
        self.fc1 = linear(width, inner)
        self.fc2 = linear(inner, width)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.fc1(x)
        return self.fc2(x * F.sigmoid(1.702 * x))


class VisionBlock(nn.Layer):
    """One vision block: pre-norm attention and MLP, each added back."""

    def __init__(self, dims: MRopeDims) -> None:
        super().__init__()
        self.norm1, self.norm2 = vision_norm(dims), vision_norm(dims)
        self.mlp = GatedMLP(dims.v_width, dims.v_inner, bias=True) if dims.gated_vision_mlp else \
            QuickGeluMLP(dims.v_width, dims.v_inner)
        self.attn = VisionAttention(dims.v_width, dims.v_heads)

    def forward(self, x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor, mask: paddle.Tensor) -> paddle.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Layer):
    """ln_q per patch, then each merge group of patches as one row through Linear, GELU, Linear."""

    def __init__(self, dims: MRopeDims) -> None:
        super().__init__()
        self.merged = dims.v_width * dims.merge**2
        self.ln_q = vision_norm(dims)
        self.mlp = nn.Sequential(linear(self.merged, self.merged), nn.GELU(), linear(self.merged, dims.v_out))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.mlp(self.ln_q(x).reshape([-1, self.merged]))


def _by_group(x: paddle.Tensor, index: paddle.Tensor, group: int) -> paddle.Tensor:
    """Rows of `x` reordered by merge group (`group` consecutive rows each) in `index` order."""
    width = x.shape[-1]
    return paddle.gather(x.reshape([-1, group, width]), index).reshape([-1, width])


class VisionTower(nn.Layer):
    """`visual`: patch embedding, `depth` blocks (0 when streamed: they are run one at a time), merger."""

    def __init__(self, dims: MRopeDims, depth: int) -> None:
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


def interleaved_rows(section: Iterable[int], slots: int) -> np.ndarray:
    """The position row (0 time, 1 height, 2 width) each of `slots` frequency slots takes in interleaved M-RoPE
    (Qwen3-VL's): slot s takes height if s % 3 == 1 and s < 3 * section[1], width if s % 3 == 2 and
    s < 3 * section[2], else time."""
    _, height, width = section
    slot = np.arange(slots)
    rows = np.zeros(slots, dtype=np.int64)
    rows[(slot % 3 == 1) & (slot < 3 * height)] = 1
    rows[(slot % 3 == 2) & (slot < 3 * width)] = 2
    return rows


class MRope(nn.Layer):
    """Text M-RoPE angles from [3, L] positions: frequency slot chunks take rows t, h, w in turn (interleaved:
    slot by slot, `interleaved_rows`)."""

    def __init__(self, head_dim: int, theta: float, section: Iterable[int], *, interleaved: bool = False) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inverse_frequencies(head_dim, theta), persistable=False)
        section = tuple(section)
        rows = interleaved_rows(section, head_dim // 2) if interleaved else \
            np.concatenate([np.full(n, i % 3) for i, n in enumerate(section)])
        # a one-hot [3, 1, d/2] selector: picking by multiply-and-sum is exact and needs no gather
        self.register_buffer("select", paddle.to_tensor((rows == np.arange(3)[:, None, None]).astype(np.float32)),
                             persistable=False)

    def forward(self, position_ids: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        freqs = (position_ids.astype("float32").unsqueeze(-1) * self.inv_freq * self.select).sum(0)
        emb = paddle.concat([freqs, freqs], axis=-1)
        return paddle.cos(emb), paddle.sin(emb)


class GroupedQueryAttention(nn.Layer):
    """q/k/v projections with biases, rotary, grouped-query causal attention, o_proj without bias."""

    def __init__(self, dims: MRopeDims) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = dims.heads, dims.kv_heads, dims.hidden // dims.heads
        self.q_proj = linear(dims.hidden, dims.heads * self.head_dim)
        self.k_proj = linear(dims.hidden, dims.kv_heads * self.head_dim)
        self.v_proj = linear(dims.hidden, dims.kv_heads * self.head_dim)
        self.o_proj = linear(dims.heads * self.head_dim, dims.hidden, bias=False)

    def forward(self, x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor, mask: paddle.Tensor | None,
                past: Cache | None = None) -> tuple[paddle.Tensor, Cache]:
        """The output for new tokens `x` after the `past` keys and values, and those extended by x's."""
        q = self.q_proj(x).reshape([-1, self.heads, self.head_dim]).transpose([1, 0, 2])
        k, v = (proj(x).reshape([-1, self.kv_heads, self.head_dim]).transpose([1, 0, 2])
                for proj in (self.k_proj, self.v_proj))
        k, v = extend(past, rotate(k, cos, sin), v)
        repeat = self.heads // self.kv_heads
        out = attention(rotate(q, cos, sin), paddle.repeat_interleave(k, repeat, axis=0),
                         paddle.repeat_interleave(v, repeat, axis=0), mask)
        return self.o_proj(out.transpose([1, 0, 2]).reshape([-1, self.heads * self.head_dim])), (k, v)


class MRopeDecoderLayer(PreNormLayer):
    """One decoder layer (`model.layers.N`)."""

    def __init__(self, dims: MRopeDims) -> None:
        super().__init__()
        self.self_attn = GroupedQueryAttention(dims)
        self.mlp = GatedMLP(dims.hidden, dims.inner, bias=False)
        self.input_layernorm = RMSNorm(dims.hidden, dims.eps)
        self.post_attention_layernorm = RMSNorm(dims.hidden, dims.eps)

    def parts(self) -> tuple[nn.Layer, nn.Layer, nn.Layer, nn.Layer]:
        return self.input_layernorm, self.self_attn, self.post_attention_layernorm, self.mlp


class MRopeTextModel(TextModel):
    """`model`: token embedding (resident only), decoder layers, final norm."""

    embedding_key, layers_key, layer_class = "embed_tokens.weight", "layers", MRopeDecoderLayer

    def __init__(self, dims: MRopeDims, layers: int, *, embedding: bool) -> None:
        super().__init__()
        if embedding:
            self.embed_tokens = nn.Embedding(dims.vocab, dims.hidden)
        self.layers = nn.LayerList([MRopeDecoderLayer(dims) for _ in range(layers)])
        self.norm = RMSNorm(dims.hidden, dims.eps)
        self.rotary = MRope(dims.hidden // dims.heads, dims.rope_theta, dims.mrope_section)

    def final_norm(self, h: paddle.Tensor) -> paddle.Tensor:
        return self.norm(h)


class MRopeVLNet(nn.Layer):
    """The whole model with PaddleMIX's children `visual`, `model` and (untied) `lm_head`."""

    def __init__(self, dims: MRopeDims) -> None:
        super().__init__()
        self.tied = dims.tied
        self.visual = VisionTower(dims, dims.v_depth)
        self.model = MRopeTextModel(dims, dims.layers, embedding=True)
        if not dims.tied:
            self.lm_head = linear(dims.hidden, dims.vocab, bias=False)

    def forward(self, input_ids: paddle.Tensor, position_ids: paddle.Tensor, image_embeds: paddle.Tensor,
                image_mask: paddle.Tensor) -> paddle.Tensor:
        h = self.model(input_ids, position_ids, image_embeds, image_mask)
        if self.tied:
            return paddle.matmul(h, self.model.embed_tokens.weight, transpose_y=True)
        return self.lm_head(h)



class _OneMaskVision(nn.Layer):
    """A windowed vision tower whose blocks all read one of its two masks (no full-attention block, or every block
    one): a static graph may not take an input its outputs do not depend on, so the unread mask is left out and
    the one mask given stands in for it."""

    def __init__(self, net: MRopeVLNet) -> None:
        super().__init__()
        self.tower = net.visual

    def forward(self, pixel_values: paddle.Tensor, vision_position_ids: paddle.Tensor, window_index: paddle.Tensor,
                reverse_index: paddle.Tensor, mask: paddle.Tensor) -> paddle.Tensor:
        return self.tower(pixel_values, vision_position_ids, mask, window_index, reverse_index, mask)


class MRopeNetwork(PaddleFamily):
    """`PaddleFamily` for the merged-patch, multimodal-rotary families; a family gives `dims` from its config."""

    text_prefix = "model."
    positions_rows = 3

    def __init__(self, dims: MRopeDims) -> None:
        self.dims = dims
        self.hidden, self.vocab, self.layers = dims.hidden, dims.vocab, dims.layers
        self.heads, self.kv_heads, self.tied, self.position_limit = dims.heads, dims.kv_heads, dims.tied, dims.positions

    def build(self) -> nn.Layer:
        return MRopeVLNet(self.dims)

    def vision_tensors(self, pixel_values: np.ndarray, vision_inputs: dict[str, np.ndarray]) -> list[paddle.Tensor]:
        dims = self.dims
        windows = ("window_index", "reverse_index", "window_mask")
        unknown = set(vision_inputs) - {"vision_position_ids", "full_mask", *windows}
        given = [vision_inputs.get(name) is not None for name in windows]
        if unknown or any(given) != dims.windowed or all(given) != dims.windowed:
            raise ValueError("the vision tower takes vision_position_ids, full_mask"
                             + (", window_index, reverse_index and window_mask" if dims.windowed else "")
                             + f"; given {', '.join(vision_inputs)}")
        patches = len(pixel_values)
        width = dims.in_chans * dims.temporal_patch * dims.patch**2
        if pixel_values.shape != (patches, width) or patches % dims.merge**2:
            raise ValueError(f"pixel_values is {list(pixel_values.shape)}; expected [N, {width}], N a multiple of "
                             f"{dims.merge**2}")
        positions, full_mask = vision_inputs["vision_position_ids"], vision_inputs["full_mask"]
        if positions.shape != (patches, 2) or full_mask.shape != (patches, patches):
            raise ValueError(f"vision_position_ids must be [{patches}, 2] and full_mask [{patches}, {patches}]")
        tensors = [float_tensor(pixel_values), int_tensor(positions), float_tensor(full_mask)]
        if dims.windowed:
            groups = patches // dims.merge**2
            window_index, reverse_index, window_mask = (vision_inputs[name] for name in windows)
            if (window_index.shape, reverse_index.shape, window_mask.shape) != ((groups,), (groups,), full_mask.shape):
                raise ValueError(f"window_index and reverse_index must be [{groups}], window_mask "
                                 f"[{patches}, {patches}]")
            tensors += [int_tensor(window_index), int_tensor(reverse_index), float_tensor(window_mask)]
        return tensors

    def stream_vision(self, weights: StreamedWeights, tensors: list[paddle.Tensor]) -> paddle.Tensor:
        pixel_values, positions, full_mask, *windows = tensors
        window_index, reverse_index, window_mask = windows or (None, None, None)
        tower = weights.fill(VisionTower(self.dims, 0), "visual.")
        block = VisionBlock(self.dims)
        x, cos, sin = tower.embed(pixel_values, positions, window_index)
        for i in range(self.dims.v_depth):
            x = weights.fill(block, f"visual.blocks.{i}.")(x, cos, sin, tower.block_mask(i, full_mask, window_mask))
        return tower.merge(x, reverse_index)

    def text_model(self, net: nn.Layer | None = None) -> TextModel:
        return net.model if net is not None else MRopeTextModel(self.dims, 0, embedding=False)

    def head(self, net: nn.Layer) -> paddle.Tensor:
        return net.model.embed_tokens.weight if self.tied else net.lm_head.weight

    def vision_graph(self, net: nn.Layer) -> tuple[Callable, list]:
        dims = self.dims
        width = dims.in_chans * dims.temporal_patch * dims.patch**2
        patches = [InputSpec([None, width], "float32", "pixel_values"),
                   InputSpec([None, 2], "int64", "vision_position_ids")]
        full = InputSpec([None, None], "float32", "full_mask")
        if not dims.windowed:
            return net.visual.forward, [*patches, full]
        order = [InputSpec([None], "int64", "window_index"), InputSpec([None], "int64", "reverse_index")]
        window = InputSpec([None, None], "float32", "window_mask")
        full_blocks = set(dims.fullatt_blocks) & set(range(dims.v_depth))
        if 0 < len(full_blocks) < dims.v_depth:
            return net.visual.forward, [*patches, full, *order, window]
        return _OneMaskVision(net).forward, [*patches, *order, full if full_blocks else window]
