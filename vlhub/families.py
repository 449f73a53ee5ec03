"""The three model families: how to recognise them and which tensors their official checkpoints hold.

`official_tensors(config)` lists every tensor of the official Hugging Face checkpoint, in the order
the official modeling code registers them, with its shape derived from config.json alone
(qwen_keys.md sections 1 and 3). The catalog counts parameters with it and the synthetic
checkpoint generator writes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vlhub.errors import UserError

Shape = tuple[int, ...]

# Filled in when a Qwen2-VL config.json omits them (re-saved copies drop default-valued keys).
QWEN2_VL_VISION_DEFAULTS = {
    "depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
    "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
}
QWEN2_5_VL_VISION_DEFAULTS = {
    "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "in_chans": 3,
    "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
}


def text_config(config: dict) -> dict:
    """Text hyper-parameters, from the official flat config or a transformers-5 nested one."""
    return {**config, **(config.get("text_config") or {})}


def vision_config(config: dict, defaults: dict) -> dict:
    """Vision hyper-parameters with the official defaults filled in."""
    return {**defaults, **(config.get("vision_config") or {})}


def tie_word_embeddings(config: dict) -> bool:
    """Whether lm_head shares the embedding (then the official file has no lm_head.weight)."""
    return bool(text_config(config).get("tie_word_embeddings", config.get("tie_word_embeddings", False)))


def _qwen2_decoder(config: dict) -> list[tuple[str, Shape]]:
    text = text_config(config)
    hidden, inter, vocab = text["hidden_size"], text["intermediate_size"], text["vocab_size"]
    heads, kv_heads = text["num_attention_heads"], text.get("num_key_value_heads", text["num_attention_heads"])
    head_dim = hidden // heads
    tensors: list[tuple[str, Shape]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for layer in range(text["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        tensors += [
            (p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
            (p + "self_attn.q_proj.bias", (heads * head_dim,)),
            (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.k_proj.bias", (kv_heads * head_dim,)),
            (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.v_proj.bias", (kv_heads * head_dim,)),
            (p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    tensors.append(("model.norm.weight", (hidden,)))
    if not tie_word_embeddings(config):
        tensors.append(("lm_head.weight", (vocab, hidden)))
    return tensors


def _qwen2_vl_tensors(config: dict) -> list[tuple[str, Shape]]:
    vis = vision_config(config, QWEN2_VL_VISION_DEFAULTS)
    width, out = vis["embed_dim"], vis.get("hidden_size", text_config(config)["hidden_size"])
    mlp = int(width * vis["mlp_ratio"])
    merged = width * vis["spatial_merge_size"] ** 2
    patch, temporal = vis["patch_size"], vis["temporal_patch_size"]
    tensors: list[tuple[str, Shape]] = [("visual.patch_embed.proj.weight", (width, vis["in_chans"], temporal, patch, patch))]
    for block in range(vis["depth"]):
        p = f"visual.blocks.{block}."
        tensors += [
            (p + "norm1.weight", (width,)), (p + "norm1.bias", (width,)),
            (p + "norm2.weight", (width,)), (p + "norm2.bias", (width,)),
            (p + "attn.qkv.weight", (3 * width, width)), (p + "attn.qkv.bias", (3 * width,)),
            (p + "attn.proj.weight", (width, width)), (p + "attn.proj.bias", (width,)),
            (p + "mlp.fc1.weight", (mlp, width)), (p + "mlp.fc1.bias", (mlp,)),
            (p + "mlp.fc2.weight", (width, mlp)), (p + "mlp.fc2.bias", (width,)),
        ]
    tensors += [
        ("visual.merger.ln_q.weight", (width,)), ("visual.merger.ln_q.bias", (width,)),
        ("visual.merger.mlp.0.weight", (merged, merged)), ("visual.merger.mlp.0.bias", (merged,)),
        ("visual.merger.mlp.2.weight", (out, merged)), ("visual.merger.mlp.2.bias", (out,)),
    ]
    return tensors + _qwen2_decoder(config)


def _qwen2_5_vl_tensors(config: dict) -> list[tuple[str, Shape]]:
    vis = vision_config(config, QWEN2_5_VL_VISION_DEFAULTS)
    width, inter = vis["hidden_size"], vis["intermediate_size"]
    out = vis.get("out_hidden_size", text_config(config)["hidden_size"])
    merged = width * vis["spatial_merge_size"] ** 2
    patch, temporal = vis["patch_size"], vis["temporal_patch_size"]
    tensors: list[tuple[str, Shape]] = [("visual.patch_embed.proj.weight", (width, vis["in_chans"], temporal, patch, patch))]
    for block in range(vis["depth"]):
        p = f"visual.blocks.{block}."
        tensors += [
            (p + "norm1.weight", (width,)), (p + "norm2.weight", (width,)),
            (p + "attn.qkv.weight", (3 * width, width)), (p + "attn.qkv.bias", (3 * width,)),
            (p + "attn.proj.weight", (width, width)), (p + "attn.proj.bias", (width,)),
            (p + "mlp.gate_proj.weight", (inter, width)), (p + "mlp.gate_proj.bias", (inter,)),
            (p + "mlp.up_proj.weight", (inter, width)), (p + "mlp.up_proj.bias", (inter,)),
            (p + "mlp.down_proj.weight", (width, inter)), (p + "mlp.down_proj.bias", (width,)),
        ]
    tensors += [
        ("visual.merger.ln_q.weight", (width,)),
        ("visual.merger.mlp.0.weight", (merged, merged)), ("visual.merger.mlp.0.bias", (merged,)),
        ("visual.merger.mlp.2.weight", (out, merged)), ("visual.merger.mlp.2.bias", (out,)),
    ]
    return tensors + _qwen2_decoder(config)


def _qwen_vl_tensors(config: dict) -> list[tuple[str, Shape]]:
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    mlp = config["intermediate_size"] // 2  # Qwen-VL splits intermediate_size over w1 and w2
    tensors: list[tuple[str, Shape]] = [("transformer.wte.weight", (vocab, hidden))]
    for layer in range(config["num_hidden_layers"]):
        p = f"transformer.h.{layer}."
        tensors += [
            (p + "ln_1.weight", (hidden,)),
            (p + "attn.c_attn.weight", (3 * hidden, hidden)), (p + "attn.c_attn.bias", (3 * hidden,)),
            (p + "attn.c_proj.weight", (hidden, hidden)),
            (p + "ln_2.weight", (hidden,)),
            (p + "mlp.w1.weight", (mlp, hidden)), (p + "mlp.w2.weight", (mlp, hidden)),
            (p + "mlp.c_proj.weight", (hidden, mlp)),
        ]
    tensors.append(("transformer.ln_f.weight", (hidden,)))
    vis = config["visual"]
    width, out, patch = vis["width"], vis["output_dim"], vis["patch_size"]
    mlp_v = int(width * vis["mlp_ratio"])
    queries = 256  # the resampler's fixed query count: 256 tokens per image
    v = "transformer.visual."
    tensors += [
        (v + "conv1.weight", (width, 3, patch, patch)),
        (v + "positional_embedding", (256, width)),
        (v + "ln_pre.weight", (width,)), (v + "ln_pre.bias", (width,)),
    ]
    for block in range(vis["layers"]):
        p = f"{v}transformer.resblocks.{block}."
        tensors += [
            (p + "ln_1.weight", (width,)), (p + "ln_1.bias", (width,)),
            (p + "attn.in_proj.weight", (3 * width, width)), (p + "attn.in_proj.bias", (3 * width,)),
            (p + "attn.out_proj.weight", (width, width)), (p + "attn.out_proj.bias", (width,)),
            (p + "ln_2.weight", (width,)), (p + "ln_2.bias", (width,)),
            (p + "mlp.c_fc.weight", (mlp_v, width)), (p + "mlp.c_fc.bias", (mlp_v,)),
            (p + "mlp.c_proj.weight", (width, mlp_v)), (p + "mlp.c_proj.bias", (width,)),
        ]
    a = v + "attn_pool."
    tensors += [(a + "pos_embed", (queries, out)), (a + "query", (queries, out))]
    if width != out:  # the resampler projects keys only when the ViT is narrower than the LLM
        tensors.append((a + "kv_proj.weight", (out, width)))
    tensors += [
        (a + "attn.in_proj_weight", (3 * out, out)), (a + "attn.in_proj_bias", (3 * out,)),
        (a + "attn.out_proj.weight", (out, out)), (a + "attn.out_proj.bias", (out,)),
        (a + "ln_q.weight", (out,)), (a + "ln_q.bias", (out,)),
        (a + "ln_kv.weight", (out,)), (a + "ln_kv.bias", (out,)),
        (v + "ln_post.weight", (out,)), (v + "ln_post.bias", (out,)),
        (v + "proj", (out, out)),
        ("lm_head.weight", (vocab, hidden)),
    ]
    return tensors


@dataclass(frozen=True)
class Family:
    """A model family: its config `model_type` and how its official checkpoint is laid out."""

    name: str
    model_type: str
    architecture: str
    official_tensors: Callable[[dict], list[tuple[str, Shape]]]
    checkpoint_format: str


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("qwen_vl", "qwen", "QWenLMHeadModel", _qwen_vl_tensors, "torch"),
        Family("qwen2_vl", "qwen2_vl", "Qwen2VLForConditionalGeneration", _qwen2_vl_tensors, "safetensors"),
        Family("qwen2_5_vl", "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", _qwen2_5_vl_tensors, "safetensors"),
    )
}
_BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES.values()}


def family_of_config(config: dict | None) -> Family | None:
    """The family a config.json's `model_type` names, if it is one of ours."""
    if not config:
        return None
    return _BY_MODEL_TYPE.get(config.get("model_type", ""))


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UserError(f"unknown family {name!r}; vlhub knows {', '.join(FAMILIES)}") from None
