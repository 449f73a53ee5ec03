"""The numpy reference forward against transformers (Qwen2-VL, Qwen2.5-VL) and torch parts (Qwen-VL) (its image
preprocessing and maths on their own: tests/unit/test_reference_maths.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from tests.helpers import hf_inputs, relative_error
from vlhub.smoke.inputs import smoke_input
from vlhub.smoke.reference import ReferenceForward
from vlhub.smoke.weights import ModelWeights

MODELS = {
    "tiny-qwen2-vl": transformers.Qwen2VLForConditionalGeneration,
    "tiny-qwen2.5-vl": transformers.Qwen2_5_VLForConditionalGeneration,
}



@pytest.fixture(scope="module", params=list(MODELS))
def hf_pair(request: pytest.FixtureRequest, tiny_qwen2_vl: Path, tiny_qwen2_5_vl: Path):
    path = {"tiny-qwen2-vl": tiny_qwen2_vl, "tiny-qwen2.5-vl": tiny_qwen2_5_vl}[request.param]
    model = MODELS[request.param].from_pretrained(path, dtype=torch.float32).eval()
    weights = ModelWeights.open(path, resident=True)
    yield model, ReferenceForward(weights)
    weights.close()



@pytest.mark.parametrize("size", [(112, 168), (224, 308), (56, 476)])
def test_vision_tower_and_logits_match_transformers(hf_pair, size: tuple[int, int]) -> None:
    model, reference = hf_pair
    smoke = smoke_input(reference.config, size)
    embeds = reference.encode_images(smoke)
    logits = reference.logits(smoke.input_ids, smoke.position_ids, embeds, smoke.image_mask)
    inputs = hf_inputs(smoke)
    with torch.no_grad():
        theirs = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        their_logits = model(**inputs).logits[0]
    assert relative_error(embeds, theirs.numpy()) < 1e-4
    assert relative_error(logits, their_logits.numpy()) < 1e-4
    assert (logits.argmax(-1) == their_logits.numpy().argmax(-1)).all()


def test_greedy_tokens_match_transformers(hf_pair) -> None:
    model, reference = hf_pair
    smoke = smoke_input(reference.config)
    _, tokens, _ = reference.generate(smoke, reference.encode_images(smoke), 5)
    inputs = hf_inputs(smoke)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out[0, len(smoke.input_ids):].tolist() == tokens


def test_rope_positions_match_transformers(hf_pair) -> None:
    model, reference = hf_pair
    smoke = smoke_input(reference.config, (224, 308))
    inputs = hf_inputs(smoke)
    positions, delta = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"])
    assert (positions[:, 0].numpy() == smoke.position_ids).all()
    assert int(delta) == smoke.rope_delta


@pytest.fixture(scope="module")
def qwen_vl(tiny_qwen_vl: Path):
    weights = ModelWeights.open(tiny_qwen_vl, resident=True)
    yield ReferenceForward(weights)
    weights.close()


def test_qwen_vl_resampler_matches_torch_multihead_attention(qwen_vl: ReferenceForward) -> None:
    a = "transformer.visual.attn_pool."
    cfg = qwen_vl.config["visual"]
    patches = np.random.default_rng(1).standard_normal((1024, cfg["width"])).astype(np.float32)
    dim = cfg["output_dim"]
    attn = torch.nn.MultiheadAttention(dim, dim // 128)
    with torch.no_grad():
        attn.in_proj_weight.copy_(torch.from_numpy(qwen_vl.w(a + "attn.in_proj_weight")))
        attn.in_proj_bias.copy_(torch.from_numpy(qwen_vl.w(a + "attn.in_proj_bias")))
        attn.out_proj.weight.copy_(torch.from_numpy(qwen_vl.w(a + "attn.out_proj.weight")))
        attn.out_proj.bias.copy_(torch.from_numpy(qwen_vl.w(a + "attn.out_proj.bias")))

        def ln(x: torch.Tensor, name: str) -> torch.Tensor:
            return torch.nn.functional.layer_norm(x, (dim,), torch.from_numpy(qwen_vl.w(a + name + ".weight")),
                                                  torch.from_numpy(qwen_vl.w(a + name + ".bias")), 1e-6)

        x = torch.from_numpy(patches) @ torch.from_numpy(qwen_vl.w(a + "kv_proj.weight")).T
        kv = ln(x, "ln_kv")[:, None]
        pos = torch.from_numpy(qwen_vl.w(a + "pos_embed"))
        pos_grid = torch.nn.functional.interpolate(pos.reshape(1, 16, 16, -1).permute(0, 3, 1, 2), size=(32, 32),
                                                   mode="bicubic", align_corners=False)
        pos_kv = pos_grid.permute(0, 2, 3, 1).reshape(1024, 1, -1)
        query = ln(torch.from_numpy(qwen_vl.w(a + "query")), "ln_q")[:, None]
        theirs = attn(query + pos[:, None], kv + pos_kv, kv)[0][:, 0].numpy()
    assert relative_error(qwen_vl._resampler(patches), theirs) < 1e-5


def test_qwen_vl_vision_attention_splits_per_head(qwen_vl: ReferenceForward) -> None:
    """The ViT's fused in_proj is grouped head by head ([q_h; k_h; v_h]), unlike the resampler's."""
    cfg = qwen_vl.config["visual"]
    width, heads = cfg["width"], cfg["heads"]
    hd = width // heads
    p = "transformer.visual.transformer.resblocks.0.attn."
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((10, width)).astype(np.float32))
    mixed = torch.nn.functional.linear(x, torch.from_numpy(qwen_vl.w(p + "in_proj.weight")),
                                       torch.from_numpy(qwen_vl.w(p + "in_proj.bias")))
    q, k, v = mixed.view(10, heads, 3 * hd).split(hd, dim=-1)
    probs = torch.softmax(torch.einsum("qhd,khd->hqk", q / hd ** 0.5, k), dim=-1)
    context = torch.einsum("hqk,khd->qhd", probs, v).reshape(10, width)
    theirs = torch.nn.functional.linear(context, torch.from_numpy(qwen_vl.w(p + "out_proj.weight")),
                                        torch.from_numpy(qwen_vl.w(p + "out_proj.bias"))).numpy()
    from vlhub.smoke.reference import attention, linear

    qkv = linear(x.numpy(), *qwen_vl.wb(p + "in_proj")).reshape(10, heads, 3, -1)
    ours = linear(attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], None), *qwen_vl.wb(p + "out_proj"))
    assert relative_error(ours, theirs) < 1e-5


def test_qwen_vl_prompt_and_generation(qwen_vl: ReferenceForward) -> None:
    smoke = smoke_input(qwen_vl.config)
    embeds = qwen_vl.encode_images(smoke)
    assert embeds.shape == (256, qwen_vl.text["hidden_size"]) and smoke.image_mask.sum() == 256
    logits, tokens, _ = qwen_vl.generate(smoke, embeds, 3)
    assert np.isfinite(logits).all() and len(tokens) == 3
    # a cached decode step computes what a full forward over the longer sequence computes
    longer = np.concatenate([smoke.input_ids, tokens[:2]])
    full = qwen_vl.logits(longer, np.arange(len(longer)), embeds, np.concatenate([smoke.image_mask, [False] * 2]))
    assert [int(t) for t in full[len(smoke.input_ids) - 1:].argmax(-1)] == tokens
    assert relative_error(full[: len(smoke.input_ids)], logits) < 1e-5


def test_streamed_weights_compute_what_resident_ones_do(tiny_qwen2_vl: Path) -> None:
    with ModelWeights.open(tiny_qwen2_vl) as streamed, ModelWeights.open(tiny_qwen2_vl, resident=True) as kept:
        smoke = smoke_input(kept.config)
        outputs = []
        for weights in (streamed, kept):
            forward = ReferenceForward(weights)
            embeds = forward.encode_images(smoke)
            outputs.append(forward.logits(smoke.input_ids, smoke.position_ids, embeds, smoke.image_mask))
        assert not streamed._kept
        np.testing.assert_array_equal(*outputs)
