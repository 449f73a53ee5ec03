"""Qwen3-VL's smoke input (both model types, dense and MoE): the image resized and normalised as the checkpoint's
preprocessor_config.json says (16-pixel patches merged 2x2, so multiples of 32), the chat prompt of Qwen2-VL's
form around it, and the multimodal rotary positions of `Qwen3VLModel.get_rope_index` (a still image is one
frame: t = s, h = s + row, w = s + column on the merged grid; the text after it resumes at s + max(rows, columns),
docs/facts/qwen3.md#text-qwen3-vl). Besides the patches the vision tower takes, computed here from the grid so a
runtime can take them as inputs: the 2-D rotary's (row, column) ids, the per-frame attention mask and the four
taps that resample the learned 48x48 position table to the grid (docs/facts/qwen3.md#vision)."""

from __future__ import annotations

from vlhub.smoke.inputs import ImageProcessing, PromptTokens, SmokeInput, position_table_input


def smoke_input(config: dict, tokens: PromptTokens, tokenizer: dict[str, int], image_size: tuple[int, int],
                processing: ImageProcessing) -> SmokeInput:
    return position_table_input(config, tokens, tokenizer, image_size, processing)
