"""Qwen3-VL's numpy reference (dense and MoE) against transformers' `Qwen3VLForConditionalGeneration` and
`Qwen3VLMoeForConditionalGeneration`: tiny models built from their config classes in float32, saved in the
official on-disk form (MoE expert tensors [E, H, 2Ie] / [E, Ie, H], not the [E, 2Ie, H] / [E, H, Ie] transformers
holds and saves) and read back through `ModelWeights`; logits text-only and with an image, the vision tower's
outputs (main merger and DeepStack features), the rotary positions and greedy tokens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from tests.helpers import QWEN3_TOKENS, QWEN3_VOCAB, hf_inputs, qwen3_text, qwen3_vision, randomize, relative_error
from vlhub.smoke.inputs import (
    ImageProcessing,
    normalize,
    preprocessor_config,
    smart_resize,
    smoke_input,
    synthetic_image,
    vision_inputs,
)
from vlhub.smoke.reference import ReferenceForward, gelu_tanh
from vlhub.smoke.weights import ModelWeights

VOCAB, TOKENS = QWEN3_VOCAB, QWEN3_TOKENS






# name -> (config class, model class, config kwargs). Between them: tied and untied (once with text_config saying
# tied where the top level, which transformers follows, says not), two, one and no DeepStack mergers (one list out
# of block order), fewer kv heads than heads, head_dim other than hidden / heads, interleaved sections that leave
# time-only slots at the end, and an MoE text config in the official spelling (rope_scaling, num_experts) as well
# as transformers 5's.
CASES = {
    "dense": (transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration, {
        "text_config": qwen3_text(64, 3, 4, 2, 24, [6, 3, 3], tie_word_embeddings=False),
        "vision_config": qwen3_vision(32, 3, 2, 64, [0, 2]), "tie_word_embeddings": False}),
    "dense-tied": (transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration, {
        "text_config": qwen3_text(48, 2, 3, 3, 16, [4, 2, 2], tie_word_embeddings=True),
        "vision_config": qwen3_vision(32, 2, 4, 48, []), "tie_word_embeddings": True}),
    "moe": (transformers.Qwen3VLMoeConfig, transformers.Qwen3VLMoeForConditionalGeneration, {
        "text_config": qwen3_text(64, 3, 4, 1, 16, [4, 2, 2], tie_word_embeddings=True, num_experts=8,
                         num_experts_per_tok=2, moe_intermediate_size=24, decoder_sparse_step=1),
        "vision_config": qwen3_vision(32, 3, 2, 64, [2, 1]), "tie_word_embeddings": False}),
    "moe-tied": (transformers.Qwen3VLMoeConfig, transformers.Qwen3VLMoeForConditionalGeneration, {
        "text_config": qwen3_text(32, 2, 2, 1, 24, [6, 3, 3], tie_word_embeddings=True, num_experts=6,
                         num_experts_per_tok=3, moe_intermediate_size=16, decoder_sparse_step=1),
        "vision_config": qwen3_vision(32, 2, 2, 32, [1]), "tie_word_embeddings": True}),
}
OFFICIAL_SPELLING = {"moe"}  # config.json written as the official files spell it (transformers 4.57)
DEEPSTACK_CASES = [name for name, (_, _, kwargs) in CASES.items()
                   if kwargs["vision_config"]["deepstack_visual_indexes"]]






def official_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as the official files store it: expert tensors with their last two axes swapped
    (docs/facts/qwen3.md#moe), lm_head kept even when tied (whether tied releases store it is not known)."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            tensor = tensor.transpose(1, 2)
        state[name] = tensor.contiguous().clone()
    return state


def official_spelling(config: dict) -> dict:
    """A transformers-5 nested config.json respelt as the official (transformers 4.57) files are."""
    text_config = dict(config["text_config"])
    rope = text_config.pop("rope_parameters")
    text_config["rope_theta"] = rope.pop("rope_theta")
    text_config["rope_scaling"] = rope
    text_config["num_experts"] = text_config.pop("num_local_experts")
    vision_config = {**config["vision_config"], "model_type": config["model_type"]}
    vision_config.pop("rope_parameters", None)
    return {**config, "text_config": text_config, "vision_config": vision_config}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    from safetensors.torch import save_file

    config_class, model_class, kwargs = CASES[request.param]
    torch.manual_seed(0)
    model = model_class(config_class(**kwargs, **TOKENS)).eval()
    randomize(model, seed=len(request.param))
    model.generation_config.eos_token_id = None  # generate exactly the tokens asked for
    directory = tmp_path_factory.mktemp(request.param)
    save_file(official_state(model), str(directory / "model.safetensors"))
    config = model.config.to_dict()
    if request.param in OFFICIAL_SPELLING:
        config = official_spelling(config)
    (directory / "config.json").write_text(json.dumps(config))
    weights = ModelWeights.open(directory, resident=True)
    yield request.param, model, ReferenceForward(weights), directory
    weights.close()



def test_the_checkpoint_is_read_in_the_official_layout(pair) -> None:
    name, model, reference, _ = pair
    assert type(reference).__module__.endswith(".reference") and type(reference).__name__ == "Reference"
    if name.startswith("moe"):
        step = reference.weights._steps["model.language_model.layers.0.mlp.experts.gate_up_proj"]
        assert not step.transpose  # stored as the official files store it, so nothing is undone
        text_config = model.config.text_config
        assert step.source.shape == (text_config.num_experts, text_config.hidden_size,
                                     2 * text_config.moe_intermediate_size)


def test_text_only_logits_match_transformers(pair) -> None:
    _, model, reference, _ = pair
    ids = np.random.default_rng(1).integers(0, 380, 23)
    ours = reference.logits(ids, np.broadcast_to(np.arange(len(ids)), (3, len(ids))))
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(ids)[None]).logits[0].numpy()
    assert relative_error(ours, theirs) < 1e-4
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


@pytest.mark.parametrize("size", [(112, 168), (333, 517), (30, 1000)])
def test_vision_tower_and_logits_match_transformers(pair, size: tuple[int, int]) -> None:
    _, model, reference, _ = pair
    smoke = smoke_input(reference.config, size)
    embeds = reference.encode_images(smoke)
    logits = reference.logits(smoke.input_ids, smoke.position_ids, embeds, smoke.image_mask)
    inputs = hf_inputs(smoke)
    with torch.no_grad():
        out = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        their_logits = model(**inputs).logits[0].numpy()
    theirs = torch.stack([out.pooler_output, *out.deepstack_features]).numpy()
    assert embeds.shape == theirs.shape == (1 + len(out.deepstack_features), smoke.image_mask.sum(),
                                            model.config.text_config.hidden_size)
    assert relative_error(embeds, theirs) < 1e-4
    assert relative_error(logits, their_logits) < 1e-4
    assert (logits.argmax(-1) == their_logits.argmax(-1)).all()


@pytest.mark.parametrize("pair", DEEPSTACK_CASES, indirect=True)
def test_deepstack_features_change_the_logits(pair) -> None:
    """Without its DeepStack features the prompt's logits differ: the comparison above exercises them."""
    _, _, reference, _ = pair
    smoke = smoke_input(reference.config)
    embeds = reference.encode_images(smoke)
    full = reference.logits(smoke.input_ids, smoke.position_ids, embeds, smoke.image_mask)
    main_only = reference.logits(smoke.input_ids, smoke.position_ids, embeds[0], smoke.image_mask)
    assert relative_error(main_only, full) > 1e-2


def test_greedy_tokens_match_transformers(pair) -> None:
    _, model, reference, _ = pair
    smoke = smoke_input(reference.config)
    _, tokens, _ = reference.generate(smoke, reference.encode_images(smoke), 5)
    with torch.no_grad():
        out = model.generate(**hf_inputs(smoke), max_new_tokens=5, do_sample=False)
    assert out[0, len(smoke.input_ids):].tolist() == tokens


def test_rope_positions_match_transformers(pair) -> None:
    _, model, reference, _ = pair
    smoke = smoke_input(reference.config, (333, 517))
    inputs = hf_inputs(smoke)
    positions, delta = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"])
    assert (positions[:, 0].numpy() == smoke.position_ids).all()
    assert int(delta) == smoke.rope_delta


def test_vision_inputs_match_transformers_grid_helpers(pair) -> None:
    """The host-side arrays a runtime takes are transformers' own: interpolation taps and rotary (row, column)."""
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

    _, model, reference, _ = pair
    smoke = smoke_input(reference.config, (30, 1000))
    assert smoke.vision is not None
    grid = torch.tensor(smoke.vision.grids)
    indices, weights = get_vision_interpolation_indices_and_weights(
        grid, num_grid_per_side=model.model.visual.num_grid_per_side, mode="bilinear", align_corners=True,
        spatial_merge_size=2)
    assert (smoke.vision.interp_indices == indices.numpy()).all()
    np.testing.assert_allclose(smoke.vision.interp_weights, weights.numpy(), atol=1e-7)
    assert (smoke.vision.position_ids == get_vision_position_ids(grid, 2).numpy()).all()


def test_the_checkpoints_preprocessor_config_sets_resize_and_normalisation(pair) -> None:
    """preprocessor_config.json beside the weights decides the pixel bounds and the normalisation, as the
    transformers image processor reads it; without one, Qwen3-VL's published values apply."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    _, _, reference, directory = pair
    published = smoke_input(reference.config, (100, 100))
    assert published.vision is not None and published.vision.grids == [(1, 16, 16)]  # 256 x 256: min 65536 pixels
    preprocessor = {"size": {"shortest_edge": 32 * 32, "longest_edge": 64 * 32 * 32}, "patch_size": 16,
                    "merge_size": 2, "temporal_patch_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                    "image_std": [0.26862954, 0.26130258, 0.27577711]}
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    try:
        read = preprocessor_config(directory)
    finally:
        (directory / "preprocessor_config.json").unlink()
    smoke = smoke_input(reference.config, (100, 100), preprocessor=read)
    assert smoke.vision is not None and smoke.vision.grids == [(1, 6, 6)]  # 96 x 96: the file's bounds
    processed = Qwen2VLImageProcessorPil(**read)(images=[Image.fromarray(synthetic_image(96, 96))],
                                                 return_tensors="np")
    assert smoke.vision.grids == [tuple(processed["image_grid_thw"][0])]
    np.testing.assert_allclose(smoke.vision.pixel_values, processed["pixel_values"], atol=1e-5)


@pytest.mark.parametrize("size", [(1080, 1920), (100, 100), (480, 640), (768, 768), (30, 1000), (5000, 40)])
def test_resize_matches_the_transformers_processor_with_the_published_values(size: tuple[int, int]) -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as theirs

    assert smart_resize(*size, factor=32, min_pixels=65536, max_pixels=16777216) == \
        theirs(*size, factor=32, min_pixels=65536, max_pixels=16777216)


def test_patches_match_the_transformers_processor_with_the_published_values() -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image = synthetic_image(224, 320)
    processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                         image_std=[0.5] * 3, size={"shortest_edge": 65536, "longest_edge": 16777216})
    processed = processor(images=[Image.fromarray(image)], return_tensors="np")
    processing = ImageProcessing(32, 65536, 16777216, np.full(3, 0.5, np.float32), np.full(3, 0.5, np.float32))
    ours = vision_inputs([normalize(image, processing.mean, processing.std)],
                         {"vision_config": {"patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2}})
    assert ours.grids == [tuple(processed["image_grid_thw"][0])]
    np.testing.assert_allclose(ours.pixel_values, processed["pixel_values"], atol=1e-6)


def test_gelu_tanh_matches_torch() -> None:
    x = np.linspace(-8, 8, 100001, dtype=np.float32)
    theirs = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    np.testing.assert_allclose(gelu_tanh(x), theirs, atol=2e-6)


def test_cached_decoding_computes_what_a_full_forward_does(pair) -> None:
    _, _, reference, _ = pair
    smoke = smoke_input(reference.config)
    embeds = reference.encode_images(smoke)
    logits, tokens, _ = reference.generate(smoke, embeds, 3)
    longer = np.concatenate([smoke.input_ids, tokens[:2]])
    positions = np.concatenate([smoke.position_ids, smoke.positions_after(2)], axis=-1)
    full = reference.logits(longer, positions, embeds, np.concatenate([smoke.image_mask, [False] * 2]))
    assert [int(t) for t in full[len(smoke.input_ids) - 1:].argmax(-1)] == tokens
    assert relative_error(full[: len(smoke.input_ids)], logits) < 1e-5


def test_the_tie_follows_the_top_level_flag(pair) -> None:
    name, model, reference, _ = pair
    tied = model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    assert tied == name.endswith("-tied")
    assert (reference.lm_head() == reference.embedding) == tied


def test_a_transformers_5_save_of_the_moe_computes_the_same(tmp_path: Path) -> None:
    """transformers 5 saves expert tensors as it holds them ([E, 2Ie, H] / [E, H, Ie]): read through the key map,
    the reference gets the official layout all the same."""
    from safetensors.torch import save_file

    config_class, model_class, kwargs = CASES["moe-tied"]
    torch.manual_seed(0)
    model = model_class(config_class(**kwargs, **TOKENS)).eval()
    randomize(model, seed=7)
    save_file({k: v.contiguous().clone() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    with ModelWeights.open(tmp_path, resident=True) as weights:
        assert weights._steps["model.language_model.layers.0.mlp.experts.down_proj"].transpose
        reference = ReferenceForward(weights)
        smoke = smoke_input(reference.config)
        ours = reference.logits(smoke.input_ids, smoke.position_ids, reference.encode_images(smoke), smoke.image_mask)
    with torch.no_grad():
        theirs = model(**hf_inputs(smoke)).logits[0].numpy()
    assert relative_error(ours, theirs) < 1e-4


def test_streamed_weights_compute_what_resident_ones_do(pair) -> None:
    _, _, resident, directory = pair
    smoke = smoke_input(resident.config)
    outputs = []
    with ModelWeights.open(directory) as streamed:
        for forward in (ReferenceForward(streamed), resident):
            embeds = forward.encode_images(smoke)
            outputs.append(forward.logits(smoke.input_ids, smoke.position_ids, embeds, smoke.image_mask))
        assert not streamed._kept
    np.testing.assert_array_equal(*outputs)


@pytest.mark.parametrize(("contents", "message"), [
    ({"size": {"shortest_edge": 70000, "longest_edge": 60000}}, "min_pixels 70000 above max_pixels 60000"),
    ({"size": {"shortest_edge": 0, "longest_edge": 60000}}, "needs a positive integer"),
    ({"min_pixels": 1 << 21}, "the smoke image would be resized"),
    ({"image_std": [0.5, 0, 0.5]}, "three numbers above 0"),
    ({"image_mean": "0.5"}, "three numbers"),
    ({"patch_size": 14, "merge_size": 2}, "multiples of 28 pixels"),
])
def test_a_preprocessor_config_the_smoke_test_cannot_use_is_refused(contents: dict, message: str) -> None:
    from vlhub.errors import UserError

    config_class, _, kwargs = CASES["dense"]
    config = config_class(**kwargs, **TOKENS).to_dict()
    smoke_input(config, preprocessor={})  # the published values do
    with pytest.raises(UserError, match=message):
        smoke_input(config, preprocessor=contents)


def test_a_preprocessor_config_that_is_not_json_is_a_corrupt_checkpoint(tmp_path: Path) -> None:
    from vlhub.errors import CorruptCheckpoint

    assert preprocessor_config(tmp_path) == {}
    (tmp_path / "preprocessor_config.json").write_text("[1, 2")
    with pytest.raises(CorruptCheckpoint, match="preprocessor_config.json"):
        preprocessor_config(tmp_path)
