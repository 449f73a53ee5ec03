"""Qwen3.5's smoke input (both model types): Qwen3-VL's, as its processor (`Qwen3VLProcessor` over
`Qwen2VLImageProcessorFast`) and `Qwen3_5Model.get_rope_index` are Qwen3-VL's: the image resized and normalised as
preprocessor_config.json says, the chat prompt around it, interleaved multimodal rotary positions, and the vision
tower's host-side inputs (2-D rotary ids, per-frame mask, the four taps resampling the learned position table)."""

from __future__ import annotations

import math

from vlhub.smoke.inputs import (
    ImageProcessing,
    PromptTokens,
    SmokeInput,
    VisionGeometry,
    bilinear_taps,
    patch_grid_input,
)

POSITION_TABLE = 2304  # num_position_embeddings when config.json leaves it out: a 48x48 table


def smoke_input(config: dict, tokens: PromptTokens, tokenizer: dict[str, int], image_size: tuple[int, int],
                processing: ImageProcessing) -> SmokeInput:
    smoke = patch_grid_input(config, tokens, tokenizer, image_size, processing=processing)
    assert smoke.vision is not None
    side = math.isqrt((config.get("vision_config") or {}).get("num_position_embeddings", POSITION_TABLE))
    smoke.vision.interp_indices, smoke.vision.interp_weights = bilinear_taps(
        smoke.vision.grids, side, VisionGeometry.from_config(config).merge)
    return smoke
