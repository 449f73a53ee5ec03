"""Qwen2-VL's reference forward (transformers' `modeling_qwen2_vl.py`): a vision tower of LayerNorm blocks with a
QuickGELU MLP (`mlp.fc1`, `mlp.fc2`), every block attending across the image, and the multimodal-rotary decoder."""

from __future__ import annotations

import numpy as np

from vlhub.smoke.inputs import SmokeInput
from vlhub.smoke.reference import MRopeDecoderForward, layer_norm, quick_gelu


class Reference(MRopeDecoderForward):
    def encode_images(self, smoke: SmokeInput) -> np.ndarray:
        assert smoke.vision is not None
        return self.merged_patches(smoke.vision, width=self.config["vision_config"]["embed_dim"], norm=self._norm,
                                   mlp=self._mlp, full_blocks=None)

    def _norm(self, x: np.ndarray, prefix: str) -> np.ndarray:
        return layer_norm(x, self.w(prefix + ".weight"), self.w(prefix + ".bias"))

    def _mlp(self, h: np.ndarray, prefix: str) -> np.ndarray:
        return self.dense(quick_gelu(self.dense(h, prefix + "fc1")), prefix + "fc2")
