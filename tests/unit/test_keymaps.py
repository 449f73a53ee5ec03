"""Key maps: data that covers every official tensor, layouts that invert, expressions that stay safe."""

from __future__ import annotations

import json

import pytest

from vlhub.catalog import models
from vlhub.errors import UserError
from vlhub.keymaps import FAMILY_FILES, load_keymap
from vlhub.keymaps.expr import evaluate

SPECS = [spec for spec in models().values()]


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_every_layout_renames_reversibly_and_uniquely(spec) -> None:
    keymap = load_keymap(spec.family.name)
    official = [t.name for t in keymap.expected(spec.config)]
    assert len(set(official)) == len(official)
    for layout in keymap.layouts.values():
        renamed = [layout.from_official(name) for name in official]
        assert len(set(renamed)) == len(renamed), layout.name
        assert [layout.to_official(name) for name in renamed] == official, layout.name


def test_qwen_vl_inference_names_are_what_paddlenlp_reads() -> None:
    layout = load_keymap("qwen_vl").layout("paddle-inference")
    assert layout.from_official("transformer.h.3.attn.c_attn.weight") == "qwen.h.3.attn.c_attn.weight"
    assert layout.from_official("transformer.wte.weight") == "qwen.wte.weight"
    assert layout.from_official("transformer.ln_f.weight") == "qwen.ln_f.weight"
    assert layout.from_official("lm_head.weight") == "lm_head.weight"
    assert not any(layout.from_official(t.name).startswith("qwen.llm.")
                   for t in load_keymap("qwen_vl").expected(models()["qwen-vl-7b"].config))


@pytest.mark.parametrize("family", FAMILY_FILES)
def test_only_linear_weights_and_experts_are_transposed(family: str) -> None:
    keymap = load_keymap(family)
    for layout in keymap.layouts.values():
        assert layout.transpose <= {"linear", "experts"}
    for rule in keymap.tensors:
        if rule.kind == "linear":
            assert rule.template.endswith(("weight", "in_proj_weight")) and len(rule.shape) == 2, rule.template
        if rule.kind == "experts":  # one [in, out] or [out, in] matrix per expert
            assert ".experts." in rule.template and len(rule.shape) == 3, rule.template
        if any(word in rule.template for word in ("embed_tokens", "wte", "norm", "ln_", "bias", "conv", "patch_embed")):
            assert rule.kind != "linear", rule.template


def test_tied_lm_head_is_absent_and_untied_is_linear() -> None:
    keymap = load_keymap("qwen2_vl")
    assert "lm_head.weight" not in {t.name for t in keymap.expected(models()["qwen2-vl-2b"].config)}
    head = {t.name: t for t in keymap.expected(models()["qwen2-vl-7b"].config)}["lm_head.weight"]
    assert head.kind == "linear" and head.shape == (152064, 3584)


def test_nested_transformers5_config_gives_the_same_tensors() -> None:
    flat = models()["qwen2-vl-7b"].config
    text_keys = ("hidden_size", "intermediate_size", "vocab_size", "num_attention_heads",
                 "num_key_value_heads", "num_hidden_layers", "tie_word_embeddings")
    nested = {k: v for k, v in flat.items() if k not in text_keys}
    nested["text_config"] = {k: flat[k] for k in text_keys}
    keymap = load_keymap("qwen2_vl")
    assert keymap.expected(nested) == keymap.expected(flat)


def test_missing_vision_keys_take_the_official_defaults() -> None:
    config = dict(models()["qwen2-vl-2b"].config)
    config["vision_config"] = {"hidden_size": 1536, "in_chans": 3, "model_type": "qwen2_vl", "spatial_patch_size": 14}
    keymap = load_keymap("qwen2_vl")
    assert keymap.expected(config) == keymap.expected(models()["qwen2-vl-2b"].config)


@pytest.mark.parametrize("text", ["__import__('os').system('true')", "open('x')", "a.b", "[1][0]", "(lambda: 1)()"])
def test_expressions_refuse_anything_but_arithmetic(text: str) -> None:
    with pytest.raises(ValueError):
        evaluate(text, {"a": 1})


def test_expressions_compute() -> None:
    assert evaluate("int(w * r)", {"w": 1664, "r": 4.9231}) == 8192
    assert evaluate("not tied", {"tied": False}) is True
    assert evaluate("v != out", {"v": 64, "out": 128}) is True


@pytest.mark.parametrize(("model", "key"), [("qwen2-vl-7b", "hidden_size"), ("qwen2.5-vl-7b", "out_hidden_size")])
def test_a_missing_merger_width_defaults_to_the_llm_width(model: str, key: str) -> None:
    config = json.loads(json.dumps(models()[model].config))
    del config["vision_config"][key]
    keymap = load_keymap(models()[model].family.name)
    assert keymap.expected(config) == keymap.expected(models()[model].config)


@pytest.mark.parametrize("value", ["128", 0, -4, None])
def test_a_malformed_dim_is_a_clean_error(value) -> None:
    config = dict(models()["tiny-qwen2-vl"].config, num_attention_heads=value)
    if value is None:
        del config["num_attention_heads"]
    with pytest.raises(UserError, match="num_attention_heads"):
        load_keymap("qwen2_vl").expected(config)


def test_a_condition_on_a_placeholder_is_decided_layer_by_layer() -> None:
    """`layer in full_layers`: which tensors a layer has may depend on its index (Qwen3.5's layer_types), read from
    a list of one word per layer (`indices_of`)."""
    keymap = load_keymap("qwen3_5")
    config = json.loads(json.dumps(models()["tiny-qwen3.5"].config))
    config["text_config"]["layer_types"] = ["full_attention", "linear_attention", "linear_attention", "full_attention"]
    names = [t.name for t in keymap.expected(config)]
    for layer, kind in enumerate(config["text_config"]["layer_types"]):
        prefix = f"model.language_model.layers.{layer}."
        assert (prefix + "self_attn.q_proj.weight" in names) == (kind == "full_attention")
        assert (prefix + "linear_attn.A_log" in names) == (kind == "linear_attention")
    assert evaluate("layer not in full_layers", {"layer": 2, "full_layers": (0, 3)})


def test_a_drop_entry_ending_in_a_star_drops_every_name_under_it() -> None:
    keymap = load_keymap("qwen3_5")
    assert keymap.drop_condition("mtp.layers.0.mlp.experts.gate_up_proj") == "True"
    assert keymap.drop_condition("lm_head.weight") == "tied"
    assert keymap.drop_condition("model.mtp.fc.weight") is None
