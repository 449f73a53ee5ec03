"""Qwen2-VL's smoke input: the image as merged 14-pixel patches, every vision block attending across the image."""

from __future__ import annotations

from vlhub.smoke.inputs import ImageProcessing, PromptTokens, SmokeInput, patch_grid_input


def smoke_input(config: dict, tokens: PromptTokens, tokenizer: dict[str, int], image_size: tuple[int, int],
                processing: ImageProcessing) -> SmokeInput:
    return patch_grid_input(config, tokens, tokenizer, image_size, processing=processing)
