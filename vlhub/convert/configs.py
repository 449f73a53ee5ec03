"""config.json in the forms vlhub reads and writes.

Qwen-VL and Qwen2(.5)-VL checkpoints ship a flat config (text fields top-level, `vision_config` nested);
transformers 5 writes a nested one (`text_config`, `rope_parameters`, `dtype`). Converted checkpoints of those
families get the flat form, with the dtype field the target's loaders read: `torch_dtype` for Hugging Face,
`dtype` for PaddleNLP / PaddleMIX (which also drop `transformers_version`, as the PaddleMIX converter does).
A family whose official config is itself nested (`[config] nested = true`: Qwen3-VL) keeps it nested, in the
official file's spelling. `official_config` is the flat view vlhub's own code reads, whatever the family.
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


def nested_official_config(config: dict, dtype: str, *, rope_parameters: bool = False) -> dict:
    """A nested config.json as the official files of its family spell it (transformers 4.57's `rope_scaling` and
    `rope_theta`, or with `rope_parameters` transformers 5's `rope_parameters` holding `rope_theta`; `num_experts`,
    the vision sub-config's model type), declaring `dtype`: what vendor converters read, whichever transformers
    re-saved it."""
    out = {k: v for k, v in config.items() if k not in ("torch_dtype", "dtype")}
    text = dict(out.get("text_config") or {})
    if rope_parameters:
        scaling = text.pop("rope_scaling", None)
        if isinstance(scaling, dict) and "rope_parameters" not in text:
            theta = text.pop("rope_theta", None)
            text["rope_parameters"] = {**scaling, **({"rope_theta": theta} if theta is not None else {})}
    rope = None if rope_parameters else text.pop("rope_parameters", None)
    if isinstance(rope, dict) and "rope_scaling" not in text:
        text["rope_theta"] = rope.get("rope_theta", text.get("rope_theta"))
        text["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if "num_local_experts" in text and "num_experts" not in text:
        text["num_experts"] = text.pop("num_local_experts")
    text["dtype"] = dtype
    out["text_config"] = dict(sorted(text.items()))
    # top-level torch_dtype and no dtype: how FastDeploy tells a Hugging Face directory from Paddle weights
    # (docs/facts/paddleformers-qwen3-vl.md); transformers reads either
    out["torch_dtype"] = dtype
    vision = out.get("vision_config")
    if isinstance(vision, dict) and str(vision.get("model_type", "")).endswith("_vision"):
        out["vision_config"] = {**vision, "model_type": vision["model_type"][: -len("_vision")]}
    return out


def target_config(config: dict, *, dtype: str, for_paddle: bool) -> dict:
    """The config.json to write beside converted weights of `dtype`."""
    family = family_of_config(config)
    if family is not None and family.config_facts.get("nested"):
        return nested_official_config(config, dtype,
                                      rope_parameters=family.config_facts.get("rope") == "rope_parameters")
    out = official_config(config)
    out.pop("dtype", None)
    out.pop("torch_dtype", None)
    if family is not None and family.config_facts.get("precision_flags"):  # the family's own flags say the dtype
        out.update(bf16=dtype == "bfloat16", fp16=dtype == "float16", fp32=dtype == "float32")
    if for_paddle:
        out.pop("transformers_version", None)
        out["dtype"] = dtype
    else:
        out["torch_dtype"] = dtype
    return out
