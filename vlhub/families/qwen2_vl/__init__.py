"""Qwen2-VL (`Qwen2VLForConditionalGeneration`): its key map, facts and code."""
