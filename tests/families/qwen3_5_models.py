"""Tiny Qwen3.5 models for the tests (dense and MoE), built from transformers' config classes, and transformers'
float64 forward that judges the reference."""

from __future__ import annotations

import copy

import numpy as np
import torch
import transformers

from tests.helpers import QWEN3_TOKENS, QWEN3_VOCAB, qwen3_vision, randomize


def qwen3_5_text(hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int, section: list[int],
                 linear: tuple[int, int, int], partial: float = 0.25, **extra: object) -> dict:
    """A Qwen3.5 text_config: layer_types by transformers' default (every 4th full attention), a quarter of each
    head rotated by interleaved M-RoPE sections, linear attention of (key heads, value heads, head width)."""
    k_heads, v_heads, width = linear
    return {**dict(vocab_size=QWEN3_VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                   num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=2 * hidden, rms_norm_eps=1e-6,
                   linear_num_key_heads=k_heads, linear_num_value_heads=v_heads, linear_key_head_dim=width,
                   linear_value_head_dim=width, linear_conv_kernel_dim=4,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "mrope_section": section,
                                    "mrope_interleaved": True, "partial_rotary_factor": partial}), **extra}


def qwen3_5_vision(width: int, depth: int, heads: int, out: int) -> dict:
    vision = qwen3_vision(width, depth, heads, out, [])
    del vision["deepstack_visual_indexes"]  # Qwen3.5's tower has none
    return vision


MOE = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=40)
# name -> (config class, model class, config kwargs). Between them: tied and untied, two full-attention layers, as
# many linear key heads as value heads and fewer, linear heads wider than the attention heads, a 3-tap convolution,
# half of each head rotated instead of a quarter
CASES = {
    "dense": (transformers.Qwen3_5Config, transformers.Qwen3_5ForConditionalGeneration, {
        "text_config": qwen3_5_text(64, 5, 4, 2, 32, [2, 1, 1], (2, 4, 16)),
        "vision_config": qwen3_5_vision(32, 2, 2, 64), "tie_word_embeddings": False}),
    "dense-tied": (transformers.Qwen3_5Config, transformers.Qwen3_5ForConditionalGeneration, {
        "text_config": qwen3_5_text(48, 8, 2, 1, 48, [4, 4, 4], (3, 3, 24), partial=0.5, linear_conv_kernel_dim=3),
        "vision_config": qwen3_5_vision(32, 1, 4, 48), "tie_word_embeddings": True}),
    "moe": (transformers.Qwen3_5MoeConfig, transformers.Qwen3_5MoeForConditionalGeneration, {
        "text_config": qwen3_5_text(64, 4, 4, 2, 32, [2, 1, 1], (2, 4, 16), **MOE),
        "vision_config": qwen3_5_vision(32, 2, 2, 64), "tie_word_embeddings": False}),
}


def realistic(model: torch.nn.Module, seed: int) -> None:
    """`randomize`'s weights, but the `1 + w` norms' weights near 0 as the releases store them (transformers
    initialises them to zeros) and the router's of variance 2 / hidden: near 1, the norms double every residual
    branch, and a unit-normal router turns a 1e-6 difference in its input into 1e-4 in the expert weights; either
    makes the comparison measure the tiny model's conditioning rather than the forward."""
    randomize(model, seed)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.startswith("model.language_model.") and name.endswith("norm.weight") and "linear_attn" not in name:
                param.copy_(0.2 * noise)
            elif name.endswith("mlp.gate.weight"):
                param.copy_(noise * (2 / param.shape[-1]) ** 0.5)


def build(name: str, seed: int = 0) -> torch.nn.Module:
    config_class, model_class, kwargs = CASES[name]
    torch.manual_seed(0)
    model = model_class(config_class(**kwargs, **QWEN3_TOKENS)).eval()
    realistic(model, seed=len(name) + seed)
    model.generation_config.eos_token_id = None  # generate exactly the tokens asked for
    return model


def in_float64(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of a model (its experts computed one at a time: the grouped product takes no float64)."""
    exact = copy.deepcopy(model).double()
    if hasattr(exact, "set_experts_implementation") and getattr(exact.config.text_config, "num_experts", 0):
        exact.set_experts_implementation("eager")
    return exact


def logits64(model: torch.nn.Module, **inputs: torch.Tensor) -> np.ndarray:
    inputs = {name: value.double() if value.is_floating_point() else value for name, value in inputs.items()}
    with torch.no_grad():
        return model(**inputs).logits[0].numpy()
