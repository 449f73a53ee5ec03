"""Qwen2-VL's Paddle network (PaddleMIX's names): the merged-patch tower with LayerNorm blocks and a QuickGELU MLP,
every block attending across the image. Its vision config names the tower's width `embed_dim` and its output
`hidden_size` (docs/facts/qwen-keys.md#vision-qwen2-vl)."""

from __future__ import annotations

from vlhub.convert.configs import official_config
from vlhub.smoke.paddle_mrope import MRopeDims, MRopeNetwork


class Network(MRopeNetwork):
    def __init__(self, config: dict) -> None:
        flat = official_config(config)
        vision = flat.get("vision_config") or {}
        width = vision.get("embed_dim", 1280)
        super().__init__(MRopeDims.from_config(
            flat, v_width=width, v_inner=int(width * vision.get("mlp_ratio", 4)),
            v_out=vision.get("hidden_size", flat["hidden_size"]), rms_vision=False, gated_vision_mlp=False,
            fullatt_blocks=None))
