"""Static graphs for Paddle Inference: exported from converted tiny checkpoints in both IRs, run by
paddle.inference on CPU, and held to the numpy reference on the source within the smoke tolerances."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

paddle = pytest.importorskip("paddle")

from paddle.base.proto import framework_pb2
from paddle.static import InputSpec

from tests.conformance.factory import FRESH, save_checkpoint
from tests.conformance.judge import judge_conversion
from tests.helpers import rewrite, run_vlhub, untransposed_square
from vlhub.convert.configs import target_config
from vlhub.convert.pipeline import ordered_steps, run_plan
from vlhub.convert.plan import plan_conversion
from vlhub.errors import UserError
from vlhub.formats.readers import open_checkpoint
from vlhub.formats.writers import CheckpointWriter, write_json_atomic
from vlhub.smoke.inputs import SmokeInput, smoke_input
from vlhub.smoke.paddle_forward import PaddleForward
from vlhub.smoke.paddle_mrope import MRopeVLNet
from vlhub.smoke.reference import ReferenceForward
from vlhub.smoke.verdict import TOLERANCES, Stage, Tolerance, compare_arrays
from vlhub.smoke.weights import ModelWeights
from vlhub.targets import prepare_conversion
from vlhub.targets.paddle_inference.static import StaticPredictor, _cache_shape, export_static

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen_vl")
TOKENS = 4
MAX_SEQ_LEN = 512


@pytest.fixture(scope="module")
def sources(tiny_qwen2_vl: Path, tiny_qwen2_5_vl: Path, tiny_qwen_vl: Path) -> dict[str, Path]:
    return {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl, "qwen_vl": tiny_qwen_vl}


def _paddle_inference_weights(source: Path, out: Path) -> Path:
    """`source` in the paddle-inference layout (Qwen-VL: PaddleNLP's qwen.* names), from the key map."""
    with open_checkpoint(source) as checkpoint:
        plan = plan_conversion(checkpoint.tensors, checkpoint.config, target_layout="paddle-inference")
        out.mkdir()
        with CheckpointWriter(out, "pdparams", [step.target for step in ordered_steps(plan, checkpoint)]) as writer:
            run_plan(plan, checkpoint, writer, memory_budget=64 << 20)
        write_json_atomic(out / "config.json", target_config(checkpoint.config, dtype="bfloat16", for_paddle=True))
    return out


@pytest.fixture(scope="module")
def weights(module_tmp: Callable[[str], Path], sources: dict[str, Path]) -> dict[str, Path]:
    """The weights directory of a paddle-inference layout per family: PaddleMIX names for Qwen2(.5)-VL,
    PaddleNLP's inference names for Qwen-VL."""
    root = module_tmp("static-weights")
    out = {family: prepare_conversion(str(sources[family]), to="paddle").write(root / family).out
           for family in ("qwen2_vl", "qwen2_5_vl")}
    out["qwen_vl"] = _paddle_inference_weights(sources["qwen_vl"], root / "qwen_vl")
    return out


@pytest.fixture(scope="module")
def export(module_tmp: Callable[[str], Path], weights: dict[str, Path]) -> Callable[..., tuple[dict, Path]]:
    """(summary, checkpoints directory) of a family's export, made once per ir and dtype."""
    root = module_tmp("static-graphs")
    made: dict[tuple[str, str, str], tuple[dict, Path]] = {}

    def get(family: str, ir: str = "pir", dtype: str = "bfloat16", **options: int) -> tuple[dict, Path]:
        key = (family, ir, dtype, *options.items())
        if key not in made:
            out = root / "-".join(map(str, (family, ir, dtype, *options.values())))
            summary = export_static(weights[family], out, ir=ir, dtype=dtype, max_seq_len=MAX_SEQ_LEN, **options)
            made[key] = summary, out / "checkpoints"
        return made[key]

    return get


@dataclass
class Outputs:
    image_embeds: np.ndarray
    prompt_logits: np.ndarray
    tokens: list[int]


@pytest.fixture(scope="module")
def expected(sources: dict[str, Path]) -> Callable[[str], tuple[SmokeInput, Outputs]]:
    """The smoke input of a family and the reference's outputs on the tiny source."""
    made: dict[str, tuple[SmokeInput, Outputs]] = {}

    def get(family: str) -> tuple[SmokeInput, Outputs]:
        if family not in made:
            with ModelWeights.open(sources[family], resident=True) as model:
                forward = ReferenceForward(model)
                smoke = smoke_input(model.config)
                embeds = forward.encode_images(smoke)
                logits, tokens, _ = forward.generate(smoke, embeds, TOKENS)
            made[family] = smoke, Outputs(embeds, logits, tokens)
        return made[family]

    return get


def run_static(checkpoints: Path, weights_dir: Path, smoke: SmokeInput, *, fold_weights: bool = False) -> Outputs:
    """The graphs' own greedy generation, every predictor kept (as a deployment with the memory runs them)."""
    predictor = StaticPredictor(checkpoints, weights_dir, fold_weights=fold_weights)
    try:
        vision = smoke.vision.as_kwargs() if smoke.vision is not None else {}
        embeds = predictor.encode_images(smoke.pixel_values, **vision)
        logits, tokens = predictor.generate(smoke.input_ids, smoke.position_ids, embeds, smoke.image_mask, TOKENS,
                                            smoke.positions_after)
    finally:
        predictor.close()
    return Outputs(embeds, logits, tokens)


def stages(reference: Outputs, output: Outputs, tolerance: Tolerance) -> list[Stage]:
    return [compare_arrays("vision embeddings", reference.image_embeds, output.image_embeds, tolerance),
            compare_arrays("prefill logits", reference.prompt_logits, output.prompt_logits, tolerance, top1=True)]


@pytest.mark.parametrize("ir", ["pir", "legacy"])
@pytest.mark.parametrize("family", FAMILIES)
def test_graphs_agree_with_the_reference(family: str, ir: str, export: Callable, weights: dict[str, Path],
                                         expected: Callable) -> None:
    summary, checkpoints = export(family, ir)
    prefix = "qwen" if family == "qwen_vl" else "model"
    suffix = ".json" if ir == "pir" else ".pdmodel"
    names = {path.relative_to(checkpoints).as_posix() for path in checkpoints.rglob("*")}
    info = {".pdiparams.info"} if ir == "legacy" else set()
    config = _config(checkpoints)
    layers = [f"encode_text/{prefix}_layer_{i}" for i in range(config["num_hidden_layers"])]
    graph_files = {f"{graph}{ending}" for graph in ("encode_image/vision", *layers, f"encode_text/{prefix}_head_0")
                   for ending in {suffix, ".pdiparams"} | info}
    # a graph per decoder layer for the prefill and the decode steps (no second copy of its parameters), and the
    # output projection (one block at this size)
    assert names == graph_files | {"encode_image", "encode_text", "encode_text/config.json"}
    assert set(summary["graphs"]) == {"vision", "layers", "head"}
    assert len(summary["graphs"]["layers"]) == config["num_hidden_layers"]
    for layer in summary["graphs"]["layers"]:
        assert list(layer["inputs"]) == ["hidden_states", "position_ids", "past_key_values"]
        assert layer["inputs"]["hidden_states"] == [-1, config["hidden_size"]]
        assert layer["inputs"]["past_key_values"][0] == 2
        assert layer["inputs"]["past_key_values"][2] == -1  # the cached tokens: none for the prefill
        assert layer["outputs"] == ["layer_output", "present_key_values"]
    [head] = summary["graphs"]["head"]
    assert head["inputs"] == {"hidden_states": [-1, config["hidden_size"]]} and head["outputs"] == ["logits"]
    assert head["vocab"] == [0, config["vocab_size"]]
    for graph in [summary["graphs"]["vision"], *summary["graphs"]["layers"], head]:
        assert {graph["model"], graph["params"]} <= set(summary["files"])
    assert all((checkpoints.parent / name).stat().st_size == file["size"] for name, file in summary["files"].items())
    smoke, reference = expected(family)
    output = run_static(checkpoints, weights[family], smoke)
    for stage in stages(reference, output, TOLERANCES["exact"]):
        assert stage.passed, stage
        assert stage.relative < 1e-5  # float32 summation order only
    assert output.tokens == reference.tokens


def test_weights_folded_to_float32_at_load_give_the_same_numbers(export: Callable, weights: dict[str, Path],
                                                                 expected: Callable) -> None:
    _, checkpoints = export("qwen2_5_vl")
    smoke, reference = expected("qwen2_5_vl")
    folded = run_static(checkpoints, weights["qwen2_5_vl"], smoke, fold_weights=True)
    for stage in stages(reference, folded, TOLERANCES["exact"]):
        assert stage.passed, stage
    assert folded.tokens == reference.tokens


def test_qwen_vl_weights_are_read_in_paddlenlp_names(weights: dict[str, Path]) -> None:
    with open_checkpoint(weights["qwen_vl"]) as checkpoint:
        assert "qwen.h.0.attn.c_attn.weight" in checkpoint.tensors and "qwen.wte.weight" in checkpoint.tensors
        assert not any(name.startswith("transformer.") for name in checkpoint.tensors)


def _config(checkpoints: Path) -> dict:
    return json.loads((checkpoints / "encode_text" / "config.json").read_text())


@pytest.mark.parametrize("ir", ["pir", "legacy"])
def test_the_text_graph_continues_any_cache(ir: str, export: Callable, weights: dict[str, Path],
                                            expected: Callable) -> None:
    """Several new tokens after a cache (not only the prefill's none and a decode step's one) give the logits
    and cache of one pass over all of them: causal over the new tokens, every cached one seen."""
    _, checkpoints = export("qwen2_vl", ir)
    smoke, _ = expected("qwen2_vl")
    predictor = StaticPredictor(checkpoints, weights["qwen2_vl"])
    try:
        embeds = predictor._embed(smoke.input_ids)  # the image positions keep their token's row: any do

        def run(start: int, end: int, caches: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
            return predictor.step(embeds[start:end], smoke.position_ids[..., start:end], caches, {})

        length, split = len(embeds), 5
        empty = [np.zeros(_cache_shape(predictor.network, 0), np.float32)] * predictor.network.layers
        whole, whole_caches = run(0, length, empty)
        head, head_caches = run(0, split, empty)
        tail, tail_caches = run(split, length, head_caches)
    finally:
        predictor.close()
    assert [cache.shape for cache in head_caches] == [tuple(_cache_shape(predictor.network, split))] * len(empty)
    assert [cache.shape for cache in tail_caches] == [tuple(_cache_shape(predictor.network, length))] * len(empty)
    scale = np.abs(whole).max()
    np.testing.assert_allclose(np.concatenate([head, tail]), whole, rtol=0, atol=1e-5 * scale)
    for tail_cache, whole_cache in zip(tail_caches, whole_caches, strict=True):
        np.testing.assert_allclose(tail_cache, whole_cache, rtol=0, atol=1e-5 * np.abs(whole_cache).max())


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])  # an untied lm_head [hidden, vocab]; a tied table
def test_the_output_projection_in_blocks_one_graph_at_a_time(family: str, export: Callable, weights: dict[str, Path],
                                                             expected: Callable) -> None:
    """The output projection split into head graphs of at most head_bytes each (the last one narrower) gives the
    logits of one; run one graph at a time (each predictor created, run and released), teacher-forced on the
    reference's tokens, the graphs give what resident greedy generation gives."""
    config = json.loads((weights[family] / "config.json").read_text())
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    width = vocab // 3 + 7  # three blocks of `width` entries and a narrower fourth
    summary, checkpoints = export(family, head_bytes=width * hidden * 2)
    ranges = [head["vocab"] for head in summary["graphs"]["head"]]
    assert ranges == [[start, min(start + width, vocab)] for start in range(0, vocab, width)] and len(ranges) == 3
    smoke, reference = expected(family)
    whole = run_static(export(family)[1], weights[family], smoke)
    blocks = run_static(checkpoints, weights[family], smoke)
    np.testing.assert_array_equal(blocks.prompt_logits, whole.prompt_logits)
    assert blocks.tokens == whole.tokens == reference.tokens
    predictor = StaticPredictor(checkpoints, weights[family], resident=False)
    try:
        vision = smoke.vision.as_kwargs() if smoke.vision is not None else {}
        embeds = predictor.encode_images(smoke.pixel_values, **vision)
        logits, tokens = predictor.teacher_forced(smoke.input_ids, smoke.position_ids, embeds, smoke.image_mask,
                                                  reference.tokens, smoke.positions_after)
        assert predictor._resident is None  # nothing kept between graphs
    finally:
        predictor.close()
    np.testing.assert_array_equal(embeds, blocks.image_embeds)
    np.testing.assert_allclose(logits, whole.prompt_logits, rtol=0, atol=1e-6 * np.abs(whole.prompt_logits).max())
    assert tokens == reference.tokens


def _dtypes(params_file: Path) -> list[int]:
    """The data type of every tensor of a .pdiparams: each is a u32 version, a u64 LoD level count (0), a
    u32 version, an i32 TensorDesc size, the TensorDesc, then the data."""
    data = params_file.read_bytes()
    found, offset = [], 0
    while offset < len(data):
        size = int.from_bytes(data[offset + 16:offset + 20], "little")
        desc = framework_pb2.VarType.TensorDesc()
        desc.ParseFromString(data[offset + 20:offset + 20 + size])
        itemsize = {framework_pb2.VarType.FP32: 4}.get(desc.data_type, 2)
        offset += 20 + size + itemsize * int(np.prod(desc.dims))
        found.append(desc.data_type)
    return found


def test_parameters_are_written_as_paddle_writes_them(export: Callable, weights: dict[str, Path],
                                                      tmp_path: Path) -> None:
    """The float32 export's vision parameters are byte for byte what paddle.jit.save writes for the same
    network holding the same values; the bfloat16 export stores half the bytes, as bfloat16."""
    _, checkpoints = export("qwen2_vl", dtype="float32")
    exported = checkpoints / "encode_image" / "vision.pdiparams"
    loaded = PaddleForward(weights["qwen2_vl"], streamed=False)
    with paddle.utils.unique_name.guard():  # the variable names the export gives
        net = MRopeVLNet(loaded.network.dims)
    net.set_state_dict(loaded.net.state_dict())
    dims = loaded.network.dims
    specs = [InputSpec([None, dims.in_chans * dims.temporal_patch * dims.patch**2], "float32"),
             InputSpec([None, 2], "int64"), InputSpec([None, None], "float32")]
    paddle.jit.save(paddle.jit.to_static(net.visual, input_spec=specs, full_graph=True), str(tmp_path / "vision"))
    assert (tmp_path / "vision.pdiparams").read_bytes() == exported.read_bytes()
    assert set(_dtypes(exported)) == {framework_pb2.VarType.FP32}

    _, narrow = export("qwen2_vl")
    bf16 = narrow / "encode_image" / "vision.pdiparams"
    # the rotary tables (inv_freq) stay float32
    assert set(_dtypes(bf16)) == {framework_pb2.VarType.BF16, framework_pb2.VarType.FP32}
    assert bf16.stat().st_size < 0.51 * exported.stat().st_size


def test_float16_parameters_pass_within_the_float16_tolerance(export: Callable, weights: dict[str, Path],
                                                              expected: Callable) -> None:
    _, checkpoints = export("qwen_vl", dtype="float16")
    assert set(_dtypes(checkpoints / "encode_text" / "qwen_layer_0.pdiparams")) == {framework_pb2.VarType.FP16,
                                                                             framework_pb2.VarType.FP32}
    smoke, reference = expected("qwen_vl")
    output = run_static(checkpoints, weights["qwen_vl"], smoke)
    for stage in stages(reference, output, TOLERANCES["float16"]):
        assert stage.passed, stage


def test_a_broken_weight_changes_the_exported_logits(weights: dict[str, Path], expected: Callable,
                                                     tmp_path: Path) -> None:
    broken = rewrite(weights["qwen2_vl"], tmp_path / "broken", untransposed_square)
    export_static(broken, tmp_path / "graphs", dtype="bfloat16", max_seq_len=MAX_SEQ_LEN)
    smoke, reference = expected("qwen2_vl")
    output = run_static(tmp_path / "graphs" / "checkpoints", broken, smoke)
    vision, logits = stages(reference, output, TOLERANCES["exact"])
    assert vision.passed  # the broken weight is in the decoder
    assert not logits.passed and logits.relative > 1e-3


def test_bad_requests_are_refused_before_anything_is_written(weights: dict[str, Path], export: Callable,
                                                             expected: Callable, tmp_path: Path) -> None:
    for kwargs in ({"ir": "onnx"}, {"dtype": "int8"}, {"max_seq_len": 0}, {"max_seq_len": 10**6}):
        arguments = {"dtype": "bfloat16", "max_seq_len": MAX_SEQ_LEN, **kwargs}
        with pytest.raises(UserError):
            export_static(weights["qwen_vl"], tmp_path, **arguments)
    assert not any(tmp_path.iterdir())
    smoke, _ = expected("qwen2_vl")
    predictor = StaticPredictor(export("qwen2_vl")[1], weights["qwen2_vl"])
    try:
        hidden = predictor.network.hidden
        with pytest.raises(UserError, match="max_seq_len"):
            predictor.generate(smoke.input_ids, smoke.position_ids, np.zeros((int(smoke.image_mask.sum()), hidden),
                               np.float32), smoke.image_mask, MAX_SEQ_LEN, smoke.positions_after)
        with pytest.raises(ValueError, match="window_index"):
            predictor.encode_images(smoke.pixel_values, window_index=np.zeros(1, np.int64))
    finally:
        predictor.close()


@pytest.mark.parametrize(("blocks", "inputs"), [((), "window_mask"), ((0, 1), "full_mask")])
def test_a_qwen2_5_vl_whose_blocks_read_one_mask_takes_only_that_one(tmp_path: Path, blocks: tuple[int, ...],
                                                                     inputs: str) -> None:
    """No full-attention block (or only such blocks) leaves one mask unread; Paddle refuses to save a graph with
    an input its outputs do not depend on, which crashed the export of such a (valid) transformers checkpoint."""
    spec = FRESH["qwen2_5_vl"]
    spec = replace(spec, vision=replace(spec.vision, fullatt_blocks=blocks))
    expected = dict(save_checkpoint(spec, tmp_path / "source").state_dict())
    for ir in ("pir", "legacy"):
        out = tmp_path / ir
        result = run_vlhub("convert", str(tmp_path / "source"), "--to", "paddle-inference", "--ir", ir,
                           "--out", str(out))
        assert result.returncode == 0, result.stderr
        judge_conversion(spec, "paddle-inference", out, expected)
        vision = json.loads((out / "vlhub-manifest.json").read_text())["graphs"]["vision"]["inputs"]
        unread = ({"full_mask", "window_mask"} - {inputs}).pop()
        assert inputs in vision and unread not in vision
