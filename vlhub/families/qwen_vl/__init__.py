"""Qwen-VL / Qwen-VL-Chat (trust_remote_code `QWenLMHeadModel`): its key map, facts and code."""
