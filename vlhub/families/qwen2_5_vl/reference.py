"""Qwen2.5-VL's reference forward (transformers' `modeling_qwen2_5_vl.py`): a vision tower of RMSNorm blocks with a
SwiGLU MLP, attending within windows except in `fullatt_block_indexes`, and the multimodal-rotary decoder."""

from __future__ import annotations

import numpy as np

from vlhub.smoke.inputs import SmokeInput
from vlhub.smoke.reference import MRopeDecoderForward, rms_norm, silu

VISION_EPS = 1e-6


class Reference(MRopeDecoderForward):
    def encode_images(self, smoke: SmokeInput) -> np.ndarray:
        assert smoke.vision is not None
        cfg = self.config["vision_config"]
        return self.merged_patches(smoke.vision, width=cfg["hidden_size"], norm=self._norm, mlp=self._mlp,
                                   full_blocks=set(cfg.get("fullatt_block_indexes", [])))

    def _norm(self, x: np.ndarray, prefix: str) -> np.ndarray:
        return rms_norm(x, self.w(prefix + ".weight"), VISION_EPS)

    def _mlp(self, h: np.ndarray, prefix: str) -> np.ndarray:
        act = silu(self.dense(h, prefix + "gate_proj")) * self.dense(h, prefix + "up_proj")
        return self.dense(act, prefix + "down_proj")
