"""config.json in the forms vlhub reads and writes.

Official checkpoints ship a flat config (text fields top-level, `vision_config` nested); transformers 5
writes a nested one (`text_config`, `rope_parameters`, `dtype`). Converted checkpoints get the flat
form, with the dtype field the target's loaders read: `torch_dtype` for Hugging Face, `dtype` for
PaddleNLP / PaddleMIX (which also drop `transformers_version`, as the PaddleMIX converter does).
"""

from __future__ import annotations

from vlhub.family_registry import family_of_config

# fields transformers 5 adds inside text_config that the flat official form does not have
_TEXT_ONLY = ("model_type", "layer_types", "rope_parameters", "dtype")


def official_config(config: dict) -> dict:
    """The flat official form of a config, whichever form it came in."""
    text = config.get("text_config")
    if not isinstance(text, dict):
        return dict(config)
    flat = {k: v for k, v in config.items() if k not in ("text_config", "dtype")}
    flat.update({k: v for k, v in text.items() if k not in _TEXT_ONLY})
    flat["torch_dtype"] = config.get("dtype") or text.get("dtype") or config.get("torch_dtype")
    rope = text.get("rope_parameters") or {}
    if "rope_theta" in rope:
        flat["rope_theta"] = rope["rope_theta"]
    if "mrope_section" in rope:
        flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    vision = config.get("vision_config")
    if isinstance(vision, dict):
        # transformers 5 names the vision sub-config `<type>_vision` and adds its own rope block
        flat["vision_config"] = {k: v for k, v in vision.items() if k not in ("model_type", "rope_parameters")}
    return flat


def target_config(config: dict, *, dtype: str, for_paddle: bool) -> dict:
    """The config.json to write beside converted weights of `dtype`."""
    out = official_config(config)
    out.pop("dtype", None)
    out.pop("torch_dtype", None)
    family = family_of_config(out)
    if family is not None and family.config_facts.get("precision_flags"):  # the family's own flags say the dtype
        out.update(bf16=dtype == "bfloat16", fp16=dtype == "float16", fp32=dtype == "float32")
    if for_paddle:
        out.pop("transformers_version", None)
        out["dtype"] = dtype
    else:
        out["torch_dtype"] = dtype
    return out
