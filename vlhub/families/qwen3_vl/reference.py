"""Qwen3-VL's reference forward, dense and MoE (transformers' `modeling_qwen3_vl.py` and `modeling_qwen3_vl_moe.py`;
docs/facts/qwen3.md#architecture).

Vision (`model.visual.*`): 16-pixel patches projected by the Conv3d (a matmul, with its bias), plus the learned
position table resampled to the grid (the input's four taps per patch); LayerNorm blocks (eps 1e-6) attending within
each frame, rotated by the 2-D (row, column) rotary, with an MLP `linear_fc2(act(linear_fc1))` (`hidden_act`,
gelu_pytorch_tanh in the released models); the merger (LayerNorm over each patch, then 2x2 groups, fc1, exact GELU,
fc2); and DeepStack: after each block in `deepstack_visual_indexes` a merger of its own (LayerNorm after the
grouping) gives a feature that is added to the output of decoder layer j (j-th such block) at the image positions.
`encode_images` returns them stacked: [1 + features, image tokens, hidden], the main merger's first.

Text (`model.language_model.*`): the M-RoPE decoder with a per-head RMSNorm on q and k before the rotary, no
biases, `head_dim` of its own, and interleaved multimodal rotary slots. MoE layers: router softmax (float32) over
the experts, top-k, renormalised, SwiGLU experts from the fused tensors in the official layout.
"""

from __future__ import annotations

import reprlib
from functools import cached_property

import numpy as np

from vlhub.errors import UserError
from vlhub.smoke.inputs import SmokeInput
from vlhub.smoke.reference import (
    MRopeDecoderForward,
    gelu,
    gelu_tanh,
    inverse_frequencies,
    layer_norm,
    linear,
    quick_gelu,
    rms_norm,
    rotary_tables,
    silu,
    softmax,
    vision_rotary,
)

VISION = "model.visual."
# transformers' defaults for what a config.json may leave out (`configuration_qwen3_vl.py`,
# `Qwen3VLTextRotaryEmbedding`): rope_theta is the text config class's default_theta
DEFAULT_MROPE_SECTION = (24, 20, 20)
DEFAULT_ROPE_THETA = 500000.0
# the vision MLP's activation by config.json `hidden_act` (transformers' ACT2FN names)
ACTIVATIONS = {"gelu_pytorch_tanh": gelu_tanh, "gelu_new": gelu_tanh, "gelu": gelu, "quick_gelu": quick_gelu,
               "silu": silu}


class Reference(MRopeDecoderForward):
    text_prefix = "model.language_model."
    embedding = "model.language_model.embed_tokens.weight"

    # -- vision

    def encode_images(self, smoke: SmokeInput) -> np.ndarray:
        vision = smoke.vision
        assert vision is not None and vision.interp_indices is not None and vision.interp_weights is not None
        cfg = self.config["vision_config"]
        width, heads = cfg["hidden_size"], cfg["num_heads"]
        act = cfg.get("hidden_act", "gelu_pytorch_tanh")
        if not isinstance(act, str) or act not in ACTIVATIONS:
            raise UserError(f"config.json vision_config.hidden_act is {reprlib.repr(act)}; the reference knows "
                            f"{', '.join(ACTIVATIONS)}")
        weight, bias = self.wb(VISION + "patch_embed.proj")
        x = linear(vision.pixel_values, weight.reshape(width, -1), bias)
        table = self.w(VISION + "pos_embed.weight")
        x = x + np.einsum("nk,nkc->nc", vision.interp_weights, table[vision.interp_indices])
        # theta 10000: transformers' vision rope default, which no released config.json changes
        cos, sin = vision_rotary(vision.position_ids, width // heads)

        def mlp(h: np.ndarray, prefix: str) -> np.ndarray:
            return self.dense(ACTIVATIONS[act](self.dense(h, prefix + "linear_fc1")), prefix + "linear_fc2")

        deepstack = list(cfg.get("deepstack_visual_indexes") or [])
        features = []
        for block in range(cfg["depth"]):
            x = self.vision_block(x, f"{VISION}blocks.{block}.", heads, cos, sin, vision.full_mask,
                                  norm=self._norm, mlp=mlp)
            if block in deepstack:  # in block order, each by its first place in the list, as transformers does
                features.append(self._merger(x, f"{VISION}deepstack_merger_list.{deepstack.index(block)}.",
                                             after_grouping=True))
        return np.stack([self._merger(x, VISION + "merger.", after_grouping=False), *features])

    def _norm(self, x: np.ndarray, prefix: str) -> np.ndarray:
        return layer_norm(x, self.w(prefix + ".weight"), self.w(prefix + ".bias"))

    def _merger(self, x: np.ndarray, prefix: str, *, after_grouping: bool) -> np.ndarray:
        """A patch merger: LayerNorm per patch then 2x2 grouping (the main one), or grouping then LayerNorm over the
        group (DeepStack's); fc1, exact GELU, fc2."""
        unit = self.config["vision_config"].get("spatial_merge_size", 2) ** 2
        group = x.shape[-1] * unit
        h = self._norm(x.reshape(-1, group), prefix + "norm") if after_grouping else \
            self._norm(x, prefix + "norm").reshape(-1, group)
        return self.dense(gelu(self.dense(h, prefix + "linear_fc1")), prefix + "linear_fc2")

    # -- text

    @cached_property
    def _head_dim(self) -> int:
        # the q_norm's length is the head dim: config.json's `head_dim`, whose default differs between the dense
        # (128) and the MoE (hidden / heads) text configs in transformers
        return int(self.w(self.text_prefix + "layers.0.self_attn.q_norm.weight").shape[0])

    def head_dim(self) -> int:
        return self._head_dim

    def lm_head(self) -> str:
        # transformers ties by the top-level tie_word_embeddings (absent: not tied), whatever text_config says (the
        # MoE text config defaults to true); the flat view in self.config lets text_config's win, so read the file's
        tied = (self.weights.checkpoint.config or {}).get("tie_word_embeddings", False)
        return self.embedding if tied else "lm_head.weight"

    def qk_norm(self, q: np.ndarray, k: np.ndarray, prefix: str) -> tuple[np.ndarray, np.ndarray]:
        eps = self.text["rms_norm_eps"]
        return (rms_norm(q, self.w(prefix + "self_attn.q_norm.weight"), eps),
                rms_norm(k, self.w(prefix + "self_attn.k_norm.weight"), eps))

    def text_rotary(self, position_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Interleaved M-RoPE (`Qwen3VLTextRotaryEmbedding`): of the d/2 frequency slots, slot s rotates by the
        height position if s % 3 == 1 and s < 3 * sections[1], by the width position if s % 3 == 2 and
        s < 3 * sections[2], else by the time position; the slots then repeat for the second half."""
        rope = self._rope()
        theta = float(self.text.get("rope_theta", rope.get("rope_theta", DEFAULT_ROPE_THETA)))
        sections = rope.get("mrope_section", DEFAULT_MROPE_SECTION)
        inv_freq = inverse_frequencies(self.head_dim(), theta)
        positions = np.broadcast_to(position_ids, (3, position_ids.shape[-1]))
        angles = positions[..., None].astype(np.float32) * inv_freq  # [3, L, d/2]
        slot = np.arange(len(inv_freq))
        axis = np.zeros(len(inv_freq), dtype=np.int64)
        axis[(slot % 3 == 1) & (slot < 3 * sections[1])] = 1
        axis[(slot % 3 == 2) & (slot < 3 * sections[2])] = 2
        return rotary_tables(angles[axis, :, slot].T)

    def _rope(self) -> dict:
        """The rotary settings, from whichever form config.json gives them (`rope_scaling`, or transformers 5's
        `rope_parameters`)."""
        for key in ("rope_parameters", "rope_scaling"):
            value = self.text.get(key)
            if isinstance(value, dict) and "mrope_section" in value:
                return value
        return self.text.get("rope_parameters") or {}

    # -- MoE

    def mlp(self, h: np.ndarray, layer: int, prefix: str) -> np.ndarray:
        if not self._sparse(layer):
            return super().mlp(h, layer, prefix)
        probs = softmax(self.dense(h, prefix + "mlp.gate", bias=False).astype(np.float32))  # [L, experts]
        top_k = self.text["num_experts_per_tok"]
        chosen = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]  # [L, k], highest first
        weights = np.take_along_axis(probs, chosen, axis=-1)
        # transformers' Qwen3VLMoeTextTopKRouter always renormalises the top-k (its config has no norm_topk_prob)
        weights /= weights.sum(axis=-1, keepdims=True)
        # official layout (docs/facts/qwen3.md#moe): gate_up_proj [E, H, 2Ie] (gate the first Ie columns, then up),
        # down_proj [E, Ie, H]; only the experts some token is routed to are computed, each read on its own
        out = np.zeros_like(h)
        for expert in np.unique(chosen):
            tokens, rank = np.nonzero(chosen == expert)
            fused = h[tokens] @ self.weights.entry(prefix + "mlp.experts.gate_up_proj", int(expert))
            inner = fused.shape[1] // 2
            act = silu(fused[:, :inner]) * fused[:, inner:]
            out[tokens] += (act @ self.weights.entry(prefix + "mlp.experts.down_proj", int(expert))) \
                * weights[tokens, rank, None]
        return out

    def _sparse(self, layer: int) -> bool:
        """Whether decoder layer `layer` has the MoE block (`Qwen3VLMoeTextDecoderLayer`'s rule; a dense config has
        no experts). transformers 5 saves `num_experts` as `num_local_experts`."""
        t = self.text
        experts = t.get("num_experts", t.get("num_local_experts")) or 0
        step = t.get("decoder_sparse_step") or 1
        return experts > 0 and layer not in (t.get("mlp_only_layers") or []) and (layer + 1) % step == 0
