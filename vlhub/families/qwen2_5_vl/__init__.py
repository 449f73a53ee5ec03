"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): its key map, facts and code."""
