"""Qwen3.5's smoke input (both model types): Qwen3-VL's, as its processor (`Qwen3VLProcessor` over
`Qwen2VLImageProcessorFast`) and `Qwen3_5Model.get_rope_index` are Qwen3-VL's: the image resized and normalised as
preprocessor_config.json says, the chat prompt around it, interleaved multimodal rotary positions, and the vision
tower's host-side inputs (2-D rotary ids, per-frame mask, the four taps resampling the learned position table)."""

from __future__ import annotations

from vlhub.smoke.inputs import ImageProcessing, PromptTokens, SmokeInput, position_table_input


def smoke_input(config: dict, tokens: PromptTokens, tokenizer: dict[str, int], image_size: tuple[int, int],
                processing: ImageProcessing) -> SmokeInput:
    return position_table_input(config, tokens, tokenizer, image_size, processing)
