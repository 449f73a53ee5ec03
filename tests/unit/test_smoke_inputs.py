"""The smoke test's prompt comes from the checkpoint: its own special-token ids, read from config.json and the
tokenizer files (what a conversion does when the checkpoint cannot take it: tests/cli/test_smoke_verdicts.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlhub.convert.configs import official_config
from vlhub.errors import UserError
from vlhub.smoke.inputs import CHAT_START, smoke_input, tokenizer_special_tokens


def test_the_prompt_uses_the_checkpoints_own_ids(tiny_qwen2_vl: Path) -> None:
    config = official_config(json.loads((tiny_qwen2_vl / "config.json").read_text()))
    small = {**config, "vocab_size": 1000, "image_token_id": 997, "vision_start_token_id": 995,
             "vision_end_token_id": 996, "bos_token_id": 7, "eos_token_id": 8}
    smoke = smoke_input(small)
    assert smoke.input_ids.max() < 1000 and not {7, 8} & set(smoke.input_ids.tolist())
    assert smoke.image_mask.sum() == (smoke.input_ids == 997).sum() > 0
    # chat markers only where a tokenizer names them, at its ids
    marked = smoke_input(small, tokenizer={CHAT_START: 990, "<|im_end|>": 991})
    assert marked.input_ids[0] == 990 and 991 in marked.input_ids
    # the official vocabulary keeps the official ordinary ids
    assert smoke_input(config).input_ids[:2].tolist() == [872, 198]


def test_tokenizer_files_name_the_special_tokens(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {"12": {"content": "<|im_start|>"}, "13": {"content": "<|image_pad|>"}}}))
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"id": 14, "content": "<|im_end|>"}]}))
    assert tokenizer_special_tokens(tmp_path) == {"<|im_end|>": 14, "<|im_start|>": 12, "<|image_pad|>": 13}
    (tmp_path / "tokenizer.json").write_text("{")
    with pytest.raises(UserError, match="tokenizer.json: not a tokenizer file"):
        tokenizer_special_tokens(tmp_path)
