"""Qwen2.5-VL's smoke input: merged patches as Qwen2-VL's, plus the window order and mask of the blocks that
attend within `window_size`-pixel windows (transformers' default 112 when config.json leaves it out)."""

from __future__ import annotations

from vlhub.smoke.inputs import ImageProcessing, PromptTokens, SmokeInput, patch_grid_input

DEFAULT_WINDOW = 112


def smoke_input(config: dict, tokens: PromptTokens, tokenizer: dict[str, int], image_size: tuple[int, int],
                processing: ImageProcessing) -> SmokeInput:
    window = (config.get("vision_config") or {}).get("window_size", DEFAULT_WINDOW)
    return patch_grid_input(config, tokens, tokenizer, image_size, window, processing)
