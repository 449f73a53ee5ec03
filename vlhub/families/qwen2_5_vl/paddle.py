"""Qwen2.5-VL's Paddle network (PaddleMIX's names): the merged-patch tower with RMSNorm blocks and a SwiGLU MLP,
attending within windows except in `fullatt_block_indexes`. Its vision config names the tower's width
`hidden_size` and its output `out_hidden_size` (docs/facts/qwen-keys.md#vision-qwen2-5-vl)."""

from __future__ import annotations

from vlhub.convert.configs import official_config
from vlhub.smoke.paddle_mrope import MRopeDims, MRopeNetwork

# transformers' defaults, for configs re-saved without them
DEFAULT_FULL_BLOCKS = (7, 15, 23, 31)


class Network(MRopeNetwork):
    def __init__(self, config: dict) -> None:
        flat = official_config(config)
        vision = flat.get("vision_config") or {}
        super().__init__(MRopeDims.from_config(
            flat, v_width=vision.get("hidden_size", 1280), v_inner=vision.get("intermediate_size", 3420),
            v_out=vision.get("out_hidden_size", flat["hidden_size"]), rms_vision=True, gated_vision_mlp=True,
            fullatt_blocks=tuple(vision.get("fullatt_block_indexes", DEFAULT_FULL_BLOCKS))))
