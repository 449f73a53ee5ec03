"""Qwen3-VL's Paddle network (dense and MoE) over `vlhub convert --to paddle` outputs, loaded as PaddleFormers loads
them (official names in safetensors, Linear weights transposed at load, experts fused as stored, the head from the
embedding when tied): against transformers' `Qwen3VLForConditionalGeneration` / `Qwen3VLMoeForConditionalGeneration`
on tiny models it saves (MoE experts in its own [E, 2Ie, H] re-save, which the conversion normalises to the official
[E, H, 2Ie] / [E, Ie, H]), streamed against resident, routed experts read one at a time; and the smoke test of the
built-in tiny models' `--to paddle` outputs, which passes, and fails for conversions broken on purpose."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

paddle = pytest.importorskip("paddle")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.helpers import QWEN3_TOKENS, QWEN3_VOCAB, qwen3_text, qwen3_vision, randomize, relative_error, rewrite
from vlhub.convert.configs import official_config
from vlhub.errors import CheckFailed
from vlhub.formats.readers import open_checkpoint
from vlhub.smoke.inputs import SmokeInput, smoke_input
from vlhub.smoke.paddle_forward import PaddleForward, StreamedWeights
from vlhub.smoke.run import run_smoke
from vlhub.targets import prepare_conversion, smoke_runner

VOCAB, TOKENS = QWEN3_VOCAB, QWEN3_TOKENS
PREFIX = "model.language_model.layers."






# dense and MoE, tied and untied; fewer kv heads than heads, head_dim other than hidden / heads, two, one and no
# DeepStack mergers (one list out of block order), a square k_proj (64 x 64) that a transpose would not reshape
CASES = {
    "dense": (transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration, {
        "text_config": qwen3_text(64, 3, 4, 2, 32, [8, 4, 4], tie_word_embeddings=False),
        "vision_config": qwen3_vision(32, 3, 2, 64, [2, 0]), "tie_word_embeddings": False}),
    "dense-tied": (transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration, {
        "text_config": qwen3_text(48, 2, 3, 3, 16, [4, 2, 2], tie_word_embeddings=True),
        "vision_config": qwen3_vision(32, 2, 4, 48, []), "tie_word_embeddings": True}),
    "moe": (transformers.Qwen3VLMoeConfig, transformers.Qwen3VLMoeForConditionalGeneration, {
        "text_config": qwen3_text(64, 2, 4, 1, 16, [4, 2, 2], tie_word_embeddings=False, num_experts=8,
                            num_experts_per_tok=2, moe_intermediate_size=24, decoder_sparse_step=1),
        "vision_config": qwen3_vision(32, 2, 2, 64, [1]), "tie_word_embeddings": False}),
    "moe-tied": (transformers.Qwen3VLMoeConfig, transformers.Qwen3VLMoeForConditionalGeneration, {
        "text_config": qwen3_text(32, 2, 2, 1, 24, [6, 3, 3], tie_word_embeddings=True, num_experts=6,
                            num_experts_per_tok=3, moe_intermediate_size=16, decoder_sparse_step=1),
        "vision_config": qwen3_vision(32, 2, 2, 32, [0, 1]), "tie_word_embeddings": True}),
}


MOE_CASES = [name for name in CASES if name.startswith("moe")]
DEEPSTACK_CASES = [name for name, (_, _, kwargs) in CASES.items()
                   if kwargs["vision_config"]["deepstack_visual_indexes"]]






@pytest.fixture(scope="module", params=list(CASES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """(name, the transformers model, its `--to paddle` output, a resident and a streamed forward over that)."""
    config_class, model_class, kwargs = CASES[request.param]
    torch.manual_seed(0)
    model = model_class(config_class(**kwargs, **TOKENS)).eval()
    randomize(model, seed=len(request.param))
    root = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(root / "hf")  # float32; MoE experts as transformers holds them, [E, 2Ie, H] / [E, H, Ie]
    out = prepare_conversion(str(root / "hf"), to="paddle").write(root / "paddle").out
    forwards = PaddleForward(out, streamed=False), PaddleForward(out, streamed=True)
    yield request.param, model, out, *forwards
    for forward in forwards:
        forward.close()


def hf_inputs(smoke: SmokeInput) -> dict[str, torch.Tensor]:
    assert smoke.vision is not None
    return {"input_ids": torch.from_numpy(smoke.input_ids)[None],
            "pixel_values": torch.from_numpy(smoke.vision.pixel_values),
            "image_grid_thw": torch.tensor(smoke.vision.grids),
            "mm_token_type_ids": torch.from_numpy(smoke.image_mask.astype(np.int64))[None]}


def image_case(model: torch.nn.Module, size: tuple[int, int] = (112, 168)) -> SmokeInput:
    return smoke_input(official_config(model.config.to_dict()), size)


def test_the_output_is_paddleformers_form(case) -> None:
    """Official names, torch [out, in] Linear weights, fused experts in the official layout, no tied head."""
    name, model, out, _, _ = case
    with open_checkpoint(out) as checkpoint:
        tensors = checkpoint.tensors
        assert checkpoint.format.name == "safetensors"
        text_config = model.config.text_config
        q = tensors[PREFIX + "0.self_attn.q_proj.weight"]
        assert q.shape == (text_config.num_attention_heads * text_config.head_dim, text_config.hidden_size)
        assert ("lm_head.weight" in tensors) == (not name.endswith("-tied"))
        if name.startswith("moe"):
            experts, inner = text_config.num_experts, text_config.moe_intermediate_size
            assert tensors[PREFIX + "0.mlp.experts.gate_up_proj"].shape == (experts, text_config.hidden_size, 2 * inner)
            assert tensors[PREFIX + "0.mlp.experts.down_proj"].shape == (experts, inner, text_config.hidden_size)


def test_text_only_logits_match_transformers(case) -> None:
    _, model, _, resident, _ = case
    ids = np.random.default_rng(1).integers(0, 380, 23)
    features = 1 + len(model.config.vision_config.deepstack_visual_indexes)
    hidden = model.config.text_config.hidden_size
    ours = resident.logits(ids, np.broadcast_to(np.arange(len(ids)), (3, len(ids))).copy(),
                           np.zeros((features, 0, hidden), np.float32), np.zeros(len(ids), bool))
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(ids)[None]).logits[0].numpy()
    assert relative_error(ours, theirs) < 1e-4
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


@pytest.mark.parametrize("size", [(112, 168), (30, 500)])
def test_vision_tower_and_logits_with_an_image_match_transformers(case, size: tuple[int, int]) -> None:
    _, model, _, resident, _ = case
    smoke = image_case(model, size)
    assert smoke.vision is not None
    embeds = resident.encode_images(smoke.pixel_values, **smoke.vision.as_kwargs())
    logits = resident.logits(smoke.input_ids, smoke.position_ids, embeds, smoke.image_mask)
    inputs = hf_inputs(smoke)
    with torch.no_grad():
        vision_out = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        theirs = model(**inputs).logits[0].numpy()
    expected = torch.stack([vision_out.pooler_output, *vision_out.deepstack_features]).numpy()
    assert embeds.shape == expected.shape
    assert relative_error(embeds, expected) < 1e-4
    assert relative_error(logits, theirs) < 1e-4
    assert (logits.argmax(-1) == theirs.argmax(-1)).all()


@pytest.mark.parametrize("case", DEEPSTACK_CASES, indirect=True)
def test_deepstack_features_count(case) -> None:
    """Without its DeepStack features the logits differ: the comparison above exercises them."""
    _, model, _, resident, _ = case
    smoke = image_case(model)
    assert smoke.vision is not None
    embeds = resident.encode_images(smoke.pixel_values, **smoke.vision.as_kwargs())
    full = resident.logits(smoke.input_ids, smoke.position_ids, embeds, smoke.image_mask)
    main_only = embeds.copy()
    main_only[1:] = 0
    without = resident.logits(smoke.input_ids, smoke.position_ids, main_only, smoke.image_mask)
    assert relative_error(without, full) > 1e-2


def test_streamed_matches_resident(case) -> None:
    _, model, _, resident, streamed = case
    smoke = image_case(model)
    assert smoke.vision is not None
    kwargs = smoke.vision.as_kwargs()
    embeds = resident.encode_images(smoke.pixel_values, **kwargs)
    np.testing.assert_allclose(streamed.encode_images(smoke.pixel_values, **kwargs), embeds, rtol=0, atol=1e-6)
    expected = resident.logits(smoke.input_ids, smoke.position_ids, embeds, smoke.image_mask)
    actual = streamed.logits(smoke.input_ids, smoke.position_ids, embeds, smoke.image_mask)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * float(np.abs(expected).max()))


@pytest.mark.parametrize("case", MOE_CASES, indirect=True)
def test_streamed_moe_reads_only_routed_experts_one_at_a_time(case, monkeypatch: pytest.MonkeyPatch) -> None:
    _, model, _, _, streamed = case
    reads: list[str] = []
    slices: list[tuple[str, list[int]]] = []
    original_read, original_slices = StreamedWeights.read, StreamedWeights.slices
    monkeypatch.setattr(StreamedWeights, "read", lambda self, n: reads.append(n) or original_read(self, n))
    monkeypatch.setattr(StreamedWeights, "slices",
                        lambda self, n, ids: slices.append((n, list(ids))) or original_slices(self, n, ids))
    ids = np.array([5, 17, 200, 33])
    features = 1 + len(model.config.vision_config.deepstack_visual_indexes)
    hidden = model.config.text_config.hidden_size
    streamed.logits(ids, np.tile(np.arange(4), (3, 1)), np.zeros((features, 0, hidden), np.float32),
                    np.zeros(4, bool))
    assert not [n for n in reads if ".experts." in n]  # never a whole stacked expert tensor
    expert_reads = [(n, e) for n, e in slices if ".experts." in n]
    assert expert_reads and all(len(e) == 1 for _, e in expert_reads)  # one expert's slice per read
    text_config = model.config.text_config
    for layer in range(text_config.num_hidden_layers):
        read = {e[0] for n, e in expert_reads if n.startswith(f"{PREFIX}{layer}.")}
        assert 0 < len(read) <= min(text_config.num_experts, len(ids) * text_config.num_experts_per_tok)


@pytest.mark.parametrize("case", MOE_CASES, indirect=True)
def test_read_rows_reads_entries_of_a_stacked_tensor(case) -> None:
    _, _, out, _, _ = case
    with open_checkpoint(out) as checkpoint:
        stacked = PREFIX + "1.mlp.experts.gate_up_proj"
        whole = checkpoint.read(stacked)
        np.testing.assert_array_equal(checkpoint.read_rows(stacked, np.array([3, 0, 3])), whole[[3, 0, 3]])


def test_weights_in_a_paddle_layout_are_refused(case, tmp_path: Path) -> None:
    """Linear weights stored [in, out] would be transposed twice at load: the non-square ones do not fit."""
    from safetensors.numpy import load_file, save_file

    _, _, out, _, _ = case
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    tensors = load_file(str(out / "model.safetensors"))  # float32, as transformers saved the model
    # the first layer's gate_proj (dense) or router (MoE): Linear weights that are not square
    name = next(n for n in (PREFIX + "0.mlp.gate_proj.weight", PREFIX + "0.mlp.gate.weight") if n in tensors)
    assert tensors[name].shape[0] != tensors[name].shape[1]
    tensors[name] = tensors[name].T.copy()
    save_file(tensors, str(broken / "model.safetensors"))
    for streamed in (False, True):
        with pytest.raises(CheckFailed, match=rf"mis-shaped \(1\): {name.replace('.', '[.]')} "):
            PaddleForward(broken, streamed=streamed)


# ---------------------------------------------------------------------------------------------------
# The smoke test in Paddle: conversions broken on purpose fail it


def experts_swapped(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Experts 0 and 1 of every layer trade places (the router still sends tokens by the old order)."""
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        tensors[name][[0, 1]] = tensors[name][[1, 0]]
    return tensors


def gate_and_up_swapped(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The fused [gate | up] columns in the other order, as a converter splitting them the wrong way would leave."""
    for name in [n for n in tensors if n.endswith("experts.gate_up_proj")]:
        inner = tensors[name].shape[-1] // 2
        tensors[name] = np.concatenate([tensors[name][..., inner:], tensors[name][..., :inner]], axis=-1)
    return tensors


def square_linear_transposed(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A square attention projection stored [in, out]: the loader's own transpose makes it wrong without making it
    misfit."""
    names = [f"{PREFIX}0.self_attn.{p}_proj.weight" for p in "kqvo"]
    name = next(n for n in names if tensors[n].shape[0] == tensors[n].shape[1])
    tensors[name] = tensors[name].T.copy()
    return tensors


def deepstack_zeroed(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for name in [n for n in tensors if ".deepstack_merger_list." in n and n.endswith("linear_fc2.weight")]:
        tensors[name][:] = 0
    return tensors


def q_norm_and_k_norm_swapped(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    q, k = PREFIX + "0.self_attn.q_norm.weight", PREFIX + "0.self_attn.k_norm.weight"
    tensors[q], tensors[k] = tensors[k], tensors[q]
    return tensors


# breakage -> (the drawn cases it applies to, the edit)
BREAKAGES: dict[str, tuple[tuple[str, ...], Callable]] = {
    "experts 0 and 1 swapped": (("moe", "moe-tied"), experts_swapped),
    "gate and up halves swapped": (("moe", "moe-tied"), gate_and_up_swapped),
    "square Linear weight stored [in, out]": (("dense", "dense-tied", "moe"), square_linear_transposed),
    "DeepStack mergers zeroed": (("dense", "moe", "moe-tied"), deepstack_zeroed),
    "q_norm and k_norm swapped": (tuple(CASES), q_norm_and_k_norm_swapped),
}


def test_a_drawn_models_paddle_output_passes_the_smoke_test_and_so_does_a_plain_rewrite(case, tmp_path: Path) -> None:
    """Against the transformers save it was converted from; the breakage tests below fail because of the breakage,
    not because of how they rewrite."""
    _, _, out, _, _ = case
    for checkpoint in (out, rewrite(out, tmp_path / "copy", lambda t: t)):
        report = run_smoke(smoke_runner(checkpoint), tokens=2)
        assert report.runtime == "paddle" and report.passed, report.as_dict()


@pytest.mark.parametrize(("case", "breakage"),
                         [(name, breakage) for breakage, (cases, _) in BREAKAGES.items() for name in cases],
                         indirect=["case"])
def test_a_broken_paddle_conversion_fails_the_smoke_test(case, tmp_path: Path, breakage: str) -> None:
    _, _, out, _, _ = case
    _, edit = BREAKAGES[breakage]
    report = run_smoke(smoke_runner(rewrite(out, tmp_path / "broken", edit)), tokens=2)
    assert report.runtime == "paddle"
    assert not report.passed, f"{breakage} passed: {report.as_dict()}"
    assert all(stage.name != "load" for stage in report.stages)  # the network ran: its numbers failed it
    failed = max(stage.relative or 0 for stage in report.stages)
    assert failed > 1e-2  # not a near miss


# The built-in tiny models (`vlhub convert tiny-qwen3-vl[-moe] --to paddle`). Their vocabulary is the release's
# (151936 rows), so each smoke test takes seconds: one passing run each, broken conversions of each.


@pytest.fixture(scope="module")
def tiny_paddle(tmp_path_factory: pytest.TempPathFactory, vlhub_home: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-paddle")
    return {model: prepare_conversion(model, to="paddle").write(root / model).out
            for model in ("tiny-qwen3-vl", "tiny-qwen3-vl-moe")}


@pytest.mark.parametrize(("model", "streamed", "breakage"), [
    ("tiny-qwen3-vl", False, None),
    ("tiny-qwen3-vl-moe", True, None),
    ("tiny-qwen3-vl", False, "square Linear weight stored [in, out]"),
    ("tiny-qwen3-vl-moe", True, "experts 0 and 1 swapped"),
    ("tiny-qwen3-vl-moe", False, "gate and up halves swapped"),
])
def test_the_tiny_models_paddle_outputs_in_the_smoke_test(tiny_paddle: dict[str, Path], tmp_path: Path, model: str,
                                                          streamed: bool, breakage: str | None) -> None:
    checkpoint = tiny_paddle[model] if breakage is None else \
        rewrite(tiny_paddle[model], tmp_path / "broken", BREAKAGES[breakage][1])
    report = run_smoke(smoke_runner(checkpoint), tokens=2, streamed=streamed)
    assert report.runtime == "paddle" and report.streamed == streamed
    assert report.passed == (breakage is None), report.as_dict()
