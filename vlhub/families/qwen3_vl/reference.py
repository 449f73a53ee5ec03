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

The tower, the interleaved rotary and the routed experts are `vlhub/smoke/reference.py`'s (`TableVisionForward`,
`interleaved_mrope`, `routed_experts`), which Qwen3.5 shares.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np

from vlhub.smoke.reference import (
    TableVisionForward,
    interleaved_mrope,
    rms_norm,
)

# transformers' defaults for what a config.json may leave out (`configuration_qwen3_vl.py`,
# `Qwen3VLTextRotaryEmbedding`): rope_theta is the text config class's default_theta
DEFAULT_MROPE_SECTION = (24, 20, 20)
DEFAULT_ROPE_THETA = 500000.0


class Reference(TableVisionForward):
    deepstack = True

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

    def rms_eps(self) -> float:
        """`rms_norm_eps`, or the key map's default where config.json leaves it out (as transformers defaults it)."""
        config = self.weights.checkpoint.config or self.config
        return float(self.weights.plan.keymap.resolve_dims(config)["eps"])  # type: ignore[arg-type]

    def qk_norm(self, q: np.ndarray, k: np.ndarray, prefix: str) -> tuple[np.ndarray, np.ndarray]:
        eps = self.rms_eps()
        return (rms_norm(q, self.w(prefix + "self_attn.q_norm.weight"), eps),
                rms_norm(k, self.w(prefix + "self_attn.k_norm.weight"), eps))

    def text_rotary(self, position_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Interleaved M-RoPE (`Qwen3VLTextRotaryEmbedding`): of the d/2 frequency slots, slot s rotates by the
        height position if s % 3 == 1 and s < 3 * sections[1], by the width position if s % 3 == 2 and
        s < 3 * sections[2], else by the time position; the slots then repeat for the second half."""
        rope = self._rope()
        theta = float(self.text.get("rope_theta", rope.get("rope_theta", DEFAULT_ROPE_THETA)))
        return interleaved_mrope(position_ids, self.head_dim(), theta, rope.get("mrope_section", DEFAULT_MROPE_SECTION))

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
        # transformers' Qwen3VLMoeTextTopKRouter always renormalises the top-k (its config has no norm_topk_prob);
        # official layout (docs/facts/qwen3.md#moe): gate_up_proj [E, H, 2Ie] (gate the first Ie columns, then up),
        # down_proj [E, Ie, H]
        return self.routed_experts(h, prefix + "mlp.", self.text["num_experts_per_tok"], transposed=False)

    def _sparse(self, layer: int) -> bool:
        """Whether decoder layer `layer` has the MoE block (`Qwen3VLMoeTextDecoderLayer`'s rule; a dense config has
        no experts). transformers 5 saves `num_experts` as `num_local_experts`."""
        t = self.text
        experts = t.get("num_experts", t.get("num_local_experts")) or 0
        step = t.get("decoder_sparse_step") or 1
        return experts > 0 and layer not in (t.get("mlp_only_layers") or []) and (layer + 1) % step == 0
