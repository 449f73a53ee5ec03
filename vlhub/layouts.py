"""Recognise a checkpoint's family and key layout from its names, shapes and config.json.

Layouts (qwen_keys.md section 1, paddle.md sections 1-2):
- official: the Hugging Face upload (`model.layers.N.*`, `visual.*`, `lm_head`; Qwen-VL `transformer.*`);
- transformers-5: what transformers >= 4.52 holds in memory (`model.language_model.*`, `model.visual.*`);
- paddlemix: PaddleMIX dygraph weights: Qwen2(.5)-VL keeps the official names with Linear weights
  stored [in, out]; Qwen-VL uses `transformer.llm.*` and a top-level `visual.*`;
- paddle-inference: PaddleNLP's Qwen-VL inference names (`qwen.wte`, `qwen.h.N.*`, `qwen.ln_f`).
"""

from __future__ import annotations

import re

from vlhub.families import family_of_config, text_config
from vlhub.tensors import TensorMeta

LAYOUTS = {
    "official": "official Hugging Face names",
    "transformers-5": "transformers >= 4.52 names (model.language_model.*, model.visual.*)",
    "paddlemix": "PaddleMIX names, Linear weights stored [in, out]",
    "paddle-inference": "PaddleNLP inference names (qwen.*)",
    "unknown": "not a layout vlhub recognises",
}

# A non-square Linear weight whose orientation tells torch [out, in] from Paddle [in, out]:
# the MLP up-projection, whose output width (config key) is larger than its input width.
_ORIENTATION_PROBES = {
    "qwen_vl": (re.compile(r"(transformer\.(llm\.)?|qwen\.)h\.\d+\.mlp\.w1\.weight"), "intermediate_size", 2),
    "qwen2_vl": (re.compile(r"model\.(language_model\.)?layers\.\d+\.mlp\.up_proj\.weight"), "intermediate_size", 1),
    "qwen2_5_vl": (re.compile(r"model\.(language_model\.)?layers\.\d+\.mlp\.up_proj\.weight"), "intermediate_size", 1),
}


def detect_family(config: dict | None, names: list[str]) -> str | None:
    """The family config.json names, or else the one the key names betray."""
    family = family_of_config(config)
    if family is not None:
        return family.name
    if any(n.startswith(("transformer.", "qwen.")) for n in names):
        return "qwen_vl"
    if any(re.match(r"(model\.)?visual\.blocks\.\d+\.mlp\.gate_proj\.", n) for n in names):
        return "qwen2_5_vl"
    if any(re.match(r"(model\.)?visual\.blocks\.\d+\.mlp\.fc1\.", n) for n in names):
        return "qwen2_vl"
    return None


def linear_orientation(family: str, tensors: dict[str, TensorMeta], config: dict | None) -> str | None:
    """"out_in" (torch) or "in_out" (Paddle) from one probe tensor, or None if there is none."""
    pattern, width_key, divisor = _ORIENTATION_PROBES[family]
    probe = next((meta for name, meta in tensors.items() if pattern.fullmatch(name)), None)
    if probe is None or len(probe.shape) != 2:
        return None
    width = text_config(config).get(width_key) if config else None
    if isinstance(width, int):
        width //= divisor
        if probe.shape[0] == width != probe.shape[1]:
            return "out_in"
        if probe.shape[1] == width != probe.shape[0]:
            return "in_out"
        return None
    return "out_in" if probe.shape[0] > probe.shape[1] else "in_out"


def detect_layout(family: str | None, tensors: dict[str, TensorMeta], config: dict | None) -> str:
    """One of `LAYOUTS`."""
    names = list(tensors)
    if family is None:
        return "unknown"
    if family == "qwen_vl":
        if any(n.startswith("qwen.") for n in names):
            return "paddle-inference"
        if any(n.startswith(("transformer.llm.", "visual.")) for n in names):
            return "paddlemix"
        if not any(n.startswith("transformer.") for n in names):
            return "unknown"
    elif any(n.startswith(("model.language_model.", "model.visual.")) for n in names):
        return "transformers-5"
    elif not any(n.startswith(("model.layers.", "visual.")) for n in names):
        return "unknown"
    orientation = linear_orientation(family, tensors, config)
    return {"out_in": "official", "in_out": "paddlemix"}.get(orientation or "", "unknown")
