"""Qwen-VL's smoke input: one image resized to the fixed square its ViT takes, and the resampler's 256 queries
between `<img>` and `</img>` in the prompt (Qwen's first chat format: "Picture 1:" before the image)."""

from __future__ import annotations

import numpy as np

from vlhub.smoke.inputs import (
    PICTURE_IDS,
    QUESTION_IDS,
    ImageProcessing,
    PromptTokens,
    SmokeInput,
    normalize,
    synthetic_image,
)

QUERIES = 256  # the resampler's fixed output: 256 tokens per image


def smoke_input(config: dict, tokens: PromptTokens, tokenizer: dict[str, int], image_size: tuple[int, int],
                processing: ImageProcessing | None) -> SmokeInput:
    # Qwen-VL's ids are in config.json, and every image becomes the same square (no smart resize: no processing)
    del tokenizer, image_size, processing
    visual = config.get("visual") or {}
    size = visual.get("image_size", 448)
    # <img>, </img> and the image pad are the three ids from image_start_id on
    start = tokens.checked(visual.get("image_start_id"), "config.json visual.image_start_id")
    tokens.checked(start + 2, "config.json visual.image_start_id + 2 (the image pad)")
    pixels = normalize(synthetic_image(size, size))[None]
    before = tokens.words(PICTURE_IDS)
    ids = np.array([*before, start, *[start + 2] * QUERIES, start + 1, *tokens.words(QUESTION_IDS)], dtype=np.int64)
    mask = np.zeros(len(ids), dtype=bool)
    mask[len(before) + 1:len(before) + 1 + QUERIES] = True
    return SmokeInput(config["model_type"], ids, mask, np.arange(len(ids), dtype=np.int64), 0, None, pixels)
