"""Qwen3-VL's smoke input (both model types, dense and MoE): the image resized and normalised as the checkpoint's
preprocessor_config.json says (16-pixel patches merged 2x2, so multiples of 32), the chat prompt of Qwen2-VL's
form around it, and the multimodal rotary positions of `Qwen3VLModel.get_rope_index` (a still image is one
frame: t = s, h = s + row, w = s + column on the merged grid; the text after it resumes at s + max(rows, columns),
docs/facts/qwen3.md#text-qwen3-vl). Besides the patches the vision tower takes, computed here from the grid so a
runtime can take them as inputs: the 2-D rotary's (row, column) ids, the per-frame attention mask and the four
taps that resample the learned 48x48 position table to the grid (docs/facts/qwen3.md#vision)."""

from __future__ import annotations

import math

import numpy as np

from vlhub.errors import UserError
from vlhub.smoke.inputs import (
    ImageProcessing,
    PromptTokens,
    SmokeInput,
    VisionGeometry,
    bilinear_taps,
    patch_grid_input,
)

# Qwen3-VL's published preprocessor_config.json (docs/facts/qwen3.md#processor: the Qwen3-VL-4B file): patch_size
# 16 and merge_size 2 (smart_resize's factor 32), size {shortest_edge 65536, longest_edge 16777216}, image_mean =
# image_std = [0.5, 0.5, 0.5]. Used where the checkpoint has no preprocessor_config.json or it is silent (the
# processor class's own defaults are Qwen2-VL's, which Qwen3-VL's file overrides).
PUBLISHED = ImageProcessing(
    factor=32, min_pixels=65536, max_pixels=16777216,
    mean=np.full(3, 0.5, dtype=np.float32), std=np.full(3, 0.5, dtype=np.float32),
)
POSITION_TABLE = 2304  # num_position_embeddings when config.json leaves it out: a 48x48 table


def processing(config: dict, preprocessor: dict) -> ImageProcessing:
    """How the processor prepares an image for this checkpoint: its preprocessor_config.json, the published
    values where it is silent (the factor from config.json's patch and merge sizes)."""
    geometry = VisionGeometry.from_config(config)
    factor = geometry.patch * geometry.merge
    fallback = ImageProcessing(factor, PUBLISHED.min_pixels, PUBLISHED.max_pixels, PUBLISHED.mean, PUBLISHED.std)
    found = ImageProcessing.from_preprocessor(preprocessor, fallback)
    if found.factor != factor:
        raise UserError(f"preprocessor_config.json cuts images into multiples of {found.factor} pixels (patch_size x "
                        f"merge_size), config.json's vision tower takes multiples of {factor}; fix one of them, or "
                        "convert with --no-smoke")
    return found


def smoke_input(config: dict, tokens: PromptTokens, tokenizer: dict[str, int], image_size: tuple[int, int],
                preprocessor: dict | None = None) -> SmokeInput:
    smoke = patch_grid_input(config, tokens, tokenizer, image_size, processing=processing(config, preprocessor or {}))
    assert smoke.vision is not None
    vision_config = config.get("vision_config") or {}
    side = math.isqrt(vision_config.get("num_position_embeddings", POSITION_TABLE))
    smoke.vision.interp_indices, smoke.vision.interp_weights = bilinear_taps(
        smoke.vision.grids, side, VisionGeometry.from_config(config).merge)
    return smoke
