"""The Paddle vision tower shared by the families whose patches add a learned position table resampled to the grid
(`model.visual.*`): 16-pixel patches projected by the Conv3d (a matmul with its bias), plus the table through the
four taps the input gives per patch (`interp_indices`, `interp_weights`); LayerNorm blocks attending within each
frame (`full_mask`), rotated by the 2-D rotary, with an MLP `linear_fc2(act(linear_fc1))`; the merger (LayerNorm
per patch, then 2x2 groups, fc1, exact GELU, fc2); and, where the family has DeepStack, one merger per listed block
(grouping, then LayerNorm over the group) whose features are stacked after the main merger's output.

A family's `paddle.py` reads its config into a `ModelDims` subclass (its `vision`, a `TableVisionDims`: `deepstack`
None for a tower without DeepStack, whose output is [image tokens, out]) and subclasses `TableVisionNetwork` with
its text model: the whole model is then PaddleFormers' (Hugging Face's) `model.visual`, `model.language_model` and,
untied, `lm_head`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn
from paddle.static import InputSpec

from vlhub.convert.configs import official_config
from vlhub.errors import UserError
from vlhub.keymaps import keymap_of_config
from vlhub.smoke.paddle_forward import (
    LayerNorm,
    PaddleFamily,
    StreamedWeights,
    TextModel,
    as_float32,
    float_tensor,
    int_tensor,
    linear,
)
from vlhub.smoke.paddle_mrope import VISION_EPS, VisionAttention, VisionRotary

VISION = "model.visual."
VISION_INPUTS = ("vision_position_ids", "full_mask", "interp_indices", "interp_weights")


def _quick_gelu(x: paddle.Tensor) -> paddle.Tensor:
    return x * F.sigmoid(1.702 * x)


# the vision MLP's activation by config.json `hidden_act` (transformers' ACT2FN names, as the numpy reference's)
ACTIVATIONS: dict[str, Callable[[paddle.Tensor], paddle.Tensor]] = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate=True), "gelu_new": lambda x: F.gelu(x, approximate=True),
    "gelu": F.gelu, "quick_gelu": _quick_gelu, "silu": F.silu,
}


@dataclass(frozen=True)
class TableVisionDims:
    """The vision tower's sizes: the key map's dims (as the conversion reads them) and its activation."""

    width: int
    heads: int
    inner: int
    depth: int
    out: int
    positions: int
    in_chans: int
    patch: int
    temporal_patch: int
    merge: int
    act: str
    mergers: int  # DeepStack mergers stored
    # (vision block, DeepStack merger) in block order: what feature j is made from; None: no DeepStack
    deepstack: tuple[tuple[int, int], ...] | None

    @classmethod
    def from_dims(cls, d: dict, vision: dict, *, deepstack: bool) -> TableVisionDims:
        """From the key map's resolved dims `d` and config.json's `vision_config`; `deepstack`: whether the family's
        tower has DeepStack mergers (the key map's `deepstack` dim, `deepstack_visual_indexes`)."""
        act = vision.get("hidden_act", "gelu_pytorch_tanh")
        if not isinstance(act, str) or act not in ACTIVATIONS:
            raise UserError(f"config.json vision_config.hidden_act is {act!r}; the network knows "
                            f"{', '.join(ACTIVATIONS)}")
        listed = list(vision.get("deepstack_visual_indexes") or []) if deepstack else []
        return cls(
            width=d["v_width"], heads=d["v_heads"], inner=d["v_inter"], depth=d["v_depth"], out=d["v_out"],
            positions=d["v_positions"], in_chans=d["v_in_chans"], patch=d["v_patch"], temporal_patch=d["v_temporal"],
            merge=d["v_merge"], act=act, mergers=d["deepstack"] if deepstack else 0,
            # as transformers: in block order, each block by its first place in the list
            deepstack=tuple((block, listed.index(block)) for block in range(d["v_depth"]) if block in listed)
            if deepstack else None,
        )

    @property
    def patch_width(self) -> int:
        """The values of one patch row of pixel_values."""
        return self.in_chans * self.temporal_patch * self.patch**2

    @property
    def features(self) -> int:
        """Image embeddings per image token: the main merger's and one per DeepStack block."""
        return 1 + len(self.deepstack or ())


class PatchEmbed(nn.Layer):
    """The Conv3d over (C, T, P, P) patches with its bias, computed as the matmul it is (its kernel is its stride)."""

    def __init__(self, dims: TableVisionDims) -> None:
        super().__init__()
        kernel = [dims.temporal_patch, dims.patch, dims.patch]
        self.proj = nn.Conv3D(dims.in_chans, dims.width, kernel, stride=kernel)

    def forward(self, pixel_values: paddle.Tensor) -> paddle.Tensor:
        weight = as_float32(self.proj.weight)
        return paddle.matmul(pixel_values, weight.reshape([weight.shape[0], -1]), transpose_y=True) + \
            as_float32(self.proj.bias)


class VisionMLP(nn.Layer):
    """linear_fc2(act(linear_fc1(x))), with biases."""

    def __init__(self, dims: TableVisionDims) -> None:
        super().__init__()
        self.act = ACTIVATIONS[dims.act]
        self.linear_fc1 = linear(dims.width, dims.inner)
        self.linear_fc2 = linear(dims.inner, dims.width)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Layer):
    """One vision block: LayerNorm, attention within `mask`, LayerNorm, MLP; each added back."""

    def __init__(self, dims: TableVisionDims) -> None:
        super().__init__()
        self.norm1, self.norm2 = LayerNorm(dims.width, VISION_EPS), LayerNorm(dims.width, VISION_EPS)
        self.attn = VisionAttention(dims.width, dims.heads)
        self.mlp = VisionMLP(dims)

    def forward(self, x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor, mask: paddle.Tensor) -> paddle.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Layer):
    """Each 2x2 group of patches as one row, normalised per patch before grouping (the main merger) or over the
    group after it (DeepStack's), then linear_fc1, exact GELU, linear_fc2."""

    def __init__(self, dims: TableVisionDims, *, after_grouping: bool) -> None:
        super().__init__()
        self.merged = dims.width * dims.merge**2
        self.after_grouping = after_grouping
        self.norm = LayerNorm(self.merged if after_grouping else dims.width, VISION_EPS)
        self.linear_fc1 = linear(self.merged, self.merged)
        self.linear_fc2 = linear(self.merged, dims.out)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = self.norm(x.reshape([-1, self.merged])) if self.after_grouping else \
            self.norm(x).reshape([-1, self.merged])
        return self.linear_fc2(F.gelu(self.linear_fc1(h)))


class VisionTower(nn.Layer):
    """`model.visual`: patch embedding and position table, `depth` blocks (0 when streamed: they are run one at a
    time), the merger and the DeepStack mergers. Its output: [image tokens, out] without DeepStack, else
    [1 + features, image tokens, out], the main merger's first."""

    def __init__(self, dims: TableVisionDims, depth: int) -> None:
        super().__init__()
        self.dims = dims
        self.patch_embed = PatchEmbed(dims)
        self.pos_embed = nn.Embedding(dims.positions, dims.width)
        self.rotary = VisionRotary(dims.width // dims.heads)
        self.blocks = nn.LayerList([VisionBlock(dims) for _ in range(depth)])
        self.merger = PatchMerger(dims, after_grouping=False)
        self.deepstack_merger_list = nn.LayerList(
            [PatchMerger(dims, after_grouping=True) for _ in range(dims.mergers)])

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
        return [self.deepstack_merger_list[merger](x) for listed, merger in self.dims.deepstack or ()
                if listed == block]

    def output(self, x: paddle.Tensor, found: list[paddle.Tensor]) -> paddle.Tensor:
        """The tower's output from the last block's `x` and the DeepStack features `found`."""
        if self.dims.deepstack is None:
            return self.merger(x)
        return paddle.stack([self.merger(x), *found])

    def forward(self, pixel_values: paddle.Tensor, vision_position_ids: paddle.Tensor, full_mask: paddle.Tensor,
                interp_indices: paddle.Tensor, interp_weights: paddle.Tensor) -> paddle.Tensor:
        x, cos, sin = self.embed(pixel_values, vision_position_ids, interp_indices, interp_weights)
        found: list[paddle.Tensor] = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, full_mask)
            found = found + self.features(i, x)
        return self.output(x, found)


def vision_specs(dims: TableVisionDims) -> list[InputSpec]:
    """The `paddle.static.InputSpec`s of the tower's inputs, for a static vision graph."""
    return [InputSpec([None, dims.patch_width], "float32", "pixel_values"),
            InputSpec([None, 2], "int64", "vision_position_ids"), InputSpec([None, None], "float32", "full_mask"),
            InputSpec([None, 4], "int64", "interp_indices"), InputSpec([None, 4], "float32", "interp_weights")]


def vision_tensors(dims: TableVisionDims, pixel_values: np.ndarray,
                   vision_inputs: dict[str, np.ndarray]) -> list[paddle.Tensor]:
    """The tower's inputs, checked against its sizes, as tensors in the order it takes them."""
    if set(vision_inputs) != set(VISION_INPUTS):
        raise ValueError(f"the vision tower takes {', '.join(VISION_INPUTS)}; given {', '.join(vision_inputs)}")
    patches, width = len(pixel_values), dims.patch_width
    if pixel_values.shape != (patches, width) or patches % dims.merge**2:
        raise ValueError(f"pixel_values is {list(pixel_values.shape)}; expected [N, {width}], N a multiple of "
                         f"{dims.merge**2}")
    positions, full_mask, indices, weights = (vision_inputs[name] for name in VISION_INPUTS)
    if (positions.shape, full_mask.shape, indices.shape, weights.shape) != \
            ((patches, 2), (patches, patches), (patches, 4), (patches, 4)):
        raise ValueError(f"vision_position_ids must be [{patches}, 2], full_mask [{patches}, {patches}], "
                         f"interp_indices and interp_weights [{patches}, 4]")
    if indices.size and (indices.min() < 0 or indices.max() >= dims.positions):
        raise ValueError(f"interp_indices must lie in [0, {dims.positions})")
    return [float_tensor(pixel_values), int_tensor(positions), float_tensor(full_mask), int_tensor(indices),
            float_tensor(weights)]


def stream_vision(dims: TableVisionDims, weights: StreamedWeights, tensors: list[paddle.Tensor]) -> paddle.Tensor:
    """The tower with one block's weights in memory at a time (the embedding and mergers filled first)."""
    pixel_values, positions, full_mask, indices, interp = tensors
    tower = weights.fill(VisionTower(dims, 0), VISION)
    block = VisionBlock(dims)
    x, cos, sin = tower.embed(pixel_values, positions, indices, interp)
    found: list[paddle.Tensor] = []
    for i in range(dims.depth):
        x = weights.fill(block, f"{VISION}blocks.{i}.")(x, cos, sin, full_mask)
        found = found + tower.features(i, x)
    return tower.output(x, found)


# ---------------------------------------------------------------------------------------------------
# The whole model


def config_dims(config: dict) -> tuple[dict, dict]:
    """The key map's dims of `config` (as the conversion reads them) and config.json's flat view."""
    keymap = keymap_of_config(config)
    assert keymap is not None  # family_network found the family by this config
    return keymap.resolve_dims(config), official_config(config)


@dataclass(frozen=True)
class ModelDims:
    """What these families' networks need from config.json and name alike: the key map's dims (as the conversion
    reads them) and the fields that shape no tensor. A family's dims subclass it with their own."""

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
    vision: TableVisionDims

    @classmethod
    def from_dims(cls, d: dict, flat: dict, *, deepstack: bool, **family_fields: object) -> Self:
        """The family's dims: the fields read alike, from the key map's resolved dims `d` and config.json's flat
        view (`deepstack` as `TableVisionDims.from_dims` takes it), and the family's own (the rotary's, ...)."""
        return cls(
            hidden=d["hidden"], vocab=d["vocab"], heads=d["heads"], kv_heads=d["kv_heads"], head_dim=d["head_dim"],
            layers=d["layers"], inner=d["inter"], tied=bool(d["tied"]), positions=d["positions"], moe=bool(d["moe"]),
            experts=d["experts"], experts_per_token=d["experts_per_token"], moe_inner=d["moe_inter"],
            eps=float(d["eps"]),  # bounded by the key map, its default transformers
            vision=TableVisionDims.from_dims(d, flat.get("vision_config") or {}, deepstack=deepstack),
            **family_fields,  # type: ignore[arg-type]
        )


class LanguageVisionNet(nn.Layer):
    """The whole model with PaddleFormers' (Hugging Face's) children `model` (`visual`, `language_model`) and,
    untied, `lm_head`."""

    def __init__(self, dims: ModelDims, language_model: TextModel) -> None:
        super().__init__()
        self.tied = dims.tied
        self.model = nn.Layer()
        self.model.visual = VisionTower(dims.vision, dims.vision.depth)
        self.model.language_model = language_model
        if not dims.tied:
            self.lm_head = linear(dims.hidden, dims.vocab, bias=False)

    def forward(self, input_ids: paddle.Tensor, position_ids: paddle.Tensor, image_embeds: paddle.Tensor,
                image_mask: paddle.Tensor) -> paddle.Tensor:
        text = self.model.language_model
        h = text(input_ids, position_ids, image_embeds, image_mask)
        if self.tied:
            return paddle.matmul(h, as_float32(text.embed_tokens.weight), transpose_y=True)
        return self.lm_head(h)


class TableVisionNetwork(PaddleFamily):
    """A family's `Network` over `LanguageVisionNet`: the family gives `dims_class` (`from_config(config)`, a
    `ModelDims`) and `text_class` (`text_class(dims, layers, embedding=...)`, its `model.language_model`)."""

    text_prefix = "model.language_model."
    positions_rows = 3
    dims_class: type[ModelDims]
    text_class: type[TextModel]

    def __init__(self, config: dict) -> None:
        self.dims = dims = self.dims_class.from_config(config)
        self.hidden, self.vocab, self.layers = dims.hidden, dims.vocab, dims.layers
        self.heads, self.kv_heads, self.tied, self.position_limit = dims.heads, dims.kv_heads, dims.tied, dims.positions

    def build(self) -> nn.Layer:
        return LanguageVisionNet(self.dims, self.text_class(self.dims, self.dims.layers, embedding=True))

    def vision(self, net: nn.Layer) -> nn.Layer:
        return net.model.visual

    @property
    def head_dim(self) -> int:
        return self.dims.head_dim

    def vision_tensors(self, pixel_values: np.ndarray, vision_inputs: dict[str, np.ndarray]) -> list[paddle.Tensor]:
        return vision_tensors(self.dims.vision, pixel_values, vision_inputs)

    def stream_vision(self, weights: StreamedWeights, tensors: list[paddle.Tensor]) -> paddle.Tensor:
        return stream_vision(self.dims.vision, weights, tensors)

    def text_model(self, net: nn.Layer | None = None) -> TextModel:
        return net.model.language_model if net is not None else self.text_class(self.dims, 0, embedding=False)

    def head(self, net: nn.Layer) -> paddle.Tensor:
        return net.model.language_model.embed_tokens.weight if self.tied else net.lm_head.weight
