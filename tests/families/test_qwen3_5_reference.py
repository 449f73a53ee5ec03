"""Qwen3.5's numpy reference (dense and MoE) against transformers' `Qwen3_5ForConditionalGeneration` and
`Qwen3_5MoeForConditionalGeneration`: tiny models built from their config classes in float32 and saved by
transformers itself (`save_pretrained`: the MoE's experts one at a time), read back through `ModelWeights`.

Outputs are judged against transformers' forward in float64: over an image's hundred tokens the linear-attention
layers lose float32 digits (transformers' own float32 run is up to 1.2e-4 from its float64 one, the reference within
7e-5). Logits text-only and with an image, the vision tower's output, greedy tokens against transformers' float32
generate (the linear-attention layers' recurrent state carried from step to step), the MoE's experts in every stored
form, and the recurrence against transformers' chunked form of the gated delta rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.families.qwen3_5_models import CASES, build, in_float64, logits64
from tests.helpers import hf_inputs, relative_error
from vlhub.smoke.inputs import smoke_input
from vlhub.smoke.reference import ReferenceForward
from vlhub.smoke.weights import ModelWeights


@pytest.fixture(scope="module", params=list(CASES))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    model = build(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    weights = ModelWeights.open(directory, resident=True)
    yield request.param, model, ReferenceForward(weights), directory, in_float64(model)
    weights.close()


def test_the_checkpoint_is_one_transformers_saved(pair) -> None:
    name, _, reference, directory, _ = pair
    assert type(reference).__module__.endswith("qwen3_5.reference")
    names = set(json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]) \
        if (directory / "model.safetensors.index.json").exists() else set(reference.weights.checkpoint.tensors)
    assert "model.language_model.layers.0.linear_attn.A_log" in names
    assert "model.language_model.layers.3.self_attn.q_proj.weight" in names
    if name == "moe":  # transformers 5 saves Qwen3.5's experts one at a time
        assert "model.language_model.layers.0.mlp.experts.5.down_proj.weight" in names
        assert reference.weights.plan.source_layout == "per-expert"


def test_text_only_logits_match_transformers(pair) -> None:
    _, _, reference, _, exact = pair
    ids = np.random.default_rng(1).integers(0, 380, 23)
    ours = reference.logits(ids, np.broadcast_to(np.arange(len(ids)), (3, len(ids))))
    theirs = logits64(exact, input_ids=torch.from_numpy(ids)[None])
    assert relative_error(ours, theirs) < 1e-4
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


@pytest.mark.parametrize("size", [(112, 168), (333, 517)])
def test_vision_tower_and_logits_match_transformers(pair, size: tuple[int, int]) -> None:
    _, model, reference, _, exact = pair
    smoke = smoke_input(reference.config, size)
    embeds = reference.encode_images(smoke)
    logits = reference.logits(smoke.input_ids, smoke.position_ids, embeds, smoke.image_mask)
    inputs = hf_inputs(smoke)
    with torch.no_grad():
        theirs = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output.numpy()
    their_logits = logits64(exact, **inputs)
    assert embeds.shape == theirs.shape == (smoke.image_mask.sum(), model.config.text_config.hidden_size)
    assert relative_error(embeds, theirs) < 1e-4
    assert relative_error(logits, their_logits) < 1e-4
    assert (logits.argmax(-1) == their_logits.argmax(-1)).all()


def test_greedy_tokens_match_transformers(pair) -> None:
    """Decoding one token at a time carries each linear-attention layer's convolution inputs and recurrent state,
    and each full-attention layer's keys and values, as transformers' cache does."""
    _, model, reference, _, _ = pair
    smoke = smoke_input(reference.config)
    _, tokens, _ = reference.generate(smoke, reference.encode_images(smoke), 6)
    with torch.no_grad():
        out = model.generate(**hf_inputs(smoke), max_new_tokens=6, do_sample=False)
    assert out[0, len(smoke.input_ids):].tolist() == tokens


def test_cached_decoding_computes_what_a_full_forward_does(pair) -> None:
    _, _, reference, _, _ = pair
    smoke = smoke_input(reference.config)
    embeds = reference.encode_images(smoke)
    logits, tokens, chosen_from = reference.generate(smoke, embeds, 4)
    longer = np.concatenate([smoke.input_ids, tokens[:3]])
    positions = np.concatenate([smoke.position_ids, smoke.positions_after(3)], axis=-1)
    full = reference.logits(longer, positions, embeds, np.concatenate([smoke.image_mask, [False] * 3]))
    assert [int(t) for t in full[len(smoke.input_ids) - 1:].argmax(-1)] == tokens
    assert relative_error(full[len(smoke.input_ids) - 1:], chosen_from) < 1e-5
    assert relative_error(full[: len(smoke.input_ids)], logits) < 1e-5


def test_streamed_weights_compute_what_resident_ones_do(pair) -> None:
    _, _, resident, directory, _ = pair
    smoke = smoke_input(resident.config)
    outputs = []
    with ModelWeights.open(directory) as streamed:
        for forward in (ReferenceForward(streamed), resident):
            outputs.append(forward.logits(smoke.input_ids, smoke.position_ids, forward.encode_images(smoke),
                                          smoke.image_mask))
        assert not streamed._kept
    np.testing.assert_array_equal(*outputs)


def test_the_tie_follows_the_top_level_flag(pair) -> None:
    name, model, reference, _, _ = pair
    tied = model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    assert tied == name.endswith("-tied")
    assert (reference.lm_head() == reference.embedding) == tied


@pytest.mark.parametrize("form", ["official", "experts-transposed"])
def test_the_moe_experts_fused_in_either_orientation_compute_the_same(form: str, tmp_path: Path) -> None:
    """The official files' fused experts ([E, gate | up, H], [E, H, Ie], what transformers holds) and the same
    tensors with their last two axes swapped, read through the key map, give transformers' logits."""
    model = build("moe", seed=1)
    state = {}
    for name, tensor in model.state_dict().items():
        if form == "experts-transposed" and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensor = tensor.transpose(1, 2)
        state[name] = tensor.contiguous().clone()
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    with ModelWeights.open(tmp_path) as weights:
        assert weights.plan.source_layout == form
        reference = ReferenceForward(weights)
        smoke = smoke_input(reference.config)
        ours = reference.logits(smoke.input_ids, smoke.position_ids, reference.encode_images(smoke), smoke.image_mask)
    assert relative_error(ours, logits64(in_float64(model), **hf_inputs(smoke))) < 1e-4


def test_the_recurrence_equals_transformers_chunked_gated_delta_rule() -> None:
    """vlhub's token-by-token recurrence and transformers' chunked form (what its prefill runs) agree, from a zero
    state and from a carried one."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

    from vlhub.families.qwen3_5.reference import gated_delta_rule, l2_normalize

    rng = np.random.default_rng(0)
    length, heads, dk, dv = 150, 3, 16, 8  # more than two of transformers' 64-token chunks
    q, k = (rng.standard_normal((length, heads, dk), dtype=np.float32) for _ in range(2))
    v = rng.standard_normal((length, heads, dv), dtype=np.float32)
    g = -rng.uniform(0.01, 2, (length, heads)).astype(np.float32)
    beta = rng.uniform(0, 1, (length, heads)).astype(np.float32)
    start = rng.standard_normal((heads, dk, dv), dtype=np.float32)
    ours, state = gated_delta_rule(l2_normalize(q) * np.float32(dk ** -0.5), l2_normalize(k), v, g, beta, start)

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a)[None]

    theirs, their_state = torch_chunk_gated_delta_rule(
        tensor(q), tensor(k), tensor(v), g=tensor(g), beta=tensor(beta), initial_state=tensor(start),
        output_final_state=True, use_qk_l2norm_in_kernel=True)
    assert relative_error(ours, theirs[0].numpy()) < 1e-5
    assert relative_error(state, their_state[0].numpy()) < 1e-5
