"""The Paddle forward over converted tiny checkpoints: against transformers (Qwen2-VL, Qwen2.5-VL), against a
torch transcription of Qwen-VL's own modeling code, streamed against resident, and strict about the weights."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

paddle = pytest.importorskip("paddle")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import torch.nn.functional as F
from transformers.vision_utils import (
    get_vision_cu_seqlens,
    get_vision_position_ids,
    get_vision_window_index,
)

from tests.helpers import hard_link_or_copy
from vlhub.errors import CheckFailed
from vlhub.families.qwen_vl.paddle import QwenVLDims, Resampler, resize_grid
from vlhub.formats.readers import open_checkpoint
from vlhub.formats.tensors import float32_from_bf16_bits
from vlhub.smoke.paddle_forward import PaddleForward, StreamedWeights, built_in, weights_entry
from vlhub.smoke.verdict import TOLERANCES, compare_arrays
from vlhub.targets import prepare_conversion

SHARD_BYTES = 16 << 20  # several shards and an index even for the tiny models
GRID = [1, 8, 12]  # 24 merged tokens; for Qwen2.5-VL two windows wide, the second one partial
TEXT_IDS = [151644, 872, 198, 74785, 419, 2168, 13, 151645, 198, 151644, 77091, 198]
IMG_START, IMG_END, IMG_PAD = 151857, 151858, 151859  # Qwen-VL's <img>, </img> and pad
HF_CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}


def _rel(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def converted(module_tmp: Callable[[str], Path], tiny_qwen2_vl: Path, tiny_qwen2_5_vl: Path,
              tiny_qwen_vl: Path) -> dict[str, Path]:
    root = module_tmp("paddle-forward")
    sources = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl, "qwen_vl": tiny_qwen_vl}
    for family, source in sources.items():
        prepare_conversion(str(source), to="paddle").write(root / family, max_shard_size=SHARD_BYTES)
    return {family: root / family for family in sources}


@pytest.fixture(scope="module")
def forward(converted: dict[str, Path]) -> Iterator[Callable[[str, bool], PaddleForward]]:
    built: dict[tuple[str, bool], PaddleForward] = {}

    def get(family: str, streamed: bool) -> PaddleForward:
        if (family, streamed) not in built:
            built[family, streamed] = PaddleForward(converted[family], streamed=streamed)
        return built[family, streamed]

    yield get
    for paddle_forward in built.values():
        paddle_forward.close()


@pytest.fixture(scope="module")
def hf_model(tiny_qwen2_vl: Path, tiny_qwen2_5_vl: Path) -> Callable[[str], object]:
    sources = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl}
    loaded: dict[str, object] = {}

    def get(family: str) -> object:
        if family not in loaded:
            cls = getattr(transformers, HF_CLASSES[family])
            loaded[family] = cls.from_pretrained(sources[family], dtype=torch.float32).eval()
        return loaded[family]

    return get


def test_converted_checkpoints_are_sharded(converted: dict[str, Path]) -> None:
    for path in converted.values():
        assert (path / "model_state.pdparams.index.json").is_file()
        assert len(list(path.glob("model_state-*.pdparams"))) > 1


# ---------------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL against transformers


def _segment_mask(cu_seqlens: np.ndarray, size: int) -> np.ndarray:
    mask = np.full((size, size), -1e30, dtype=np.float32)
    for start, end in pairwise(cu_seqlens):
        mask[start:end, start:end] = 0
    return mask


def _qwen2_image(model: object) -> tuple[np.ndarray, dict[str, np.ndarray], torch.Tensor]:
    """Random patches for GRID and the vision inputs, built with transformers' own helpers."""
    vision = model.config.vision_config
    grid = torch.tensor([GRID])
    patches = math.prod(GRID)
    pixels = np.random.default_rng(0).standard_normal(
        (patches, 3 * vision.temporal_patch_size * vision.patch_size**2)).astype(np.float32)
    inputs = {
        "vision_position_ids": get_vision_position_ids(grid, vision.spatial_merge_size).numpy(),
        "full_mask": _segment_mask(get_vision_cu_seqlens(grid).numpy(), patches),
    }
    if model.config.model_type == "qwen2_5_vl":
        index, cu_windows = get_vision_window_index(grid, vision.spatial_merge_size, vision.window_size,
                                                    vision.patch_size)
        assert len(cu_windows) > 2  # the test means to exercise windows
        inputs |= {"window_index": index.numpy(), "reverse_index": np.argsort(index.numpy()),
                   "window_mask": _segment_mask(cu_windows.numpy(), patches)}
    return pixels, inputs, grid


def _qwen2_prompt(model: object) -> torch.Tensor:
    config = model.config
    image = [config.vision_start_token_id] + [config.image_token_id] * (math.prod(GRID) // 4) + [config.vision_end_token_id]
    return torch.tensor([TEXT_IDS[:3] + image + TEXT_IDS[3:]])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen2_image_features_match_transformers(family: str, forward: Callable, hf_model: Callable) -> None:
    model = hf_model(family)
    pixels, inputs, grid = _qwen2_image(model)
    with torch.no_grad():
        expected = model.model.visual(torch.from_numpy(pixels), grid_thw=grid).pooler_output.numpy()
    actual = forward(family, False).encode_images(pixels, **inputs)
    assert actual.shape == expected.shape == (math.prod(GRID) // 4, model.config.text_config.hidden_size)
    assert _rel(actual, expected) <= 1e-4


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen2_text_only_logits_match_transformers(family: str, forward: Callable, hf_model: Callable) -> None:
    model = hf_model(family)
    ids = torch.tensor([TEXT_IDS])
    with torch.no_grad():
        expected = model(input_ids=ids).logits[0].numpy()
    hidden = model.config.text_config.hidden_size
    positions = np.tile(np.arange(len(TEXT_IDS)), (3, 1))
    actual = forward(family, False).logits(ids[0].numpy(), positions, np.zeros((0, hidden), np.float32),
                                           np.zeros(len(TEXT_IDS), bool))
    assert actual.shape == expected.shape
    assert _rel(actual, expected) <= 1e-4


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen2_image_logits_match_transformers(family: str, forward: Callable, hf_model: Callable) -> None:
    model = hf_model(family)
    pixels, inputs, grid = _qwen2_image(model)
    ids = _qwen2_prompt(model)
    image_tokens = ids == model.config.image_token_id
    positions, _ = model.model.get_rope_index(ids, image_tokens.int(), image_grid_thw=grid)
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=torch.from_numpy(pixels), image_grid_thw=grid,
                         mm_token_type_ids=image_tokens.int()).logits[0].numpy()
    paddle_forward = forward(family, False)
    features = paddle_forward.encode_images(pixels, **inputs)
    actual = paddle_forward.logits(ids[0].numpy(), positions[:, 0].numpy(), features, image_tokens[0].numpy())
    assert _rel(actual, expected) <= 1e-4


# ---------------------------------------------------------------------------------------------------
# Qwen-VL against a torch transcription of its modeling code (Qwen-VL's visual.py / modeling_qwen.py)


@pytest.fixture(scope="module")
def qwen_vl_official(tiny_qwen_vl: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The tiny Qwen-VL's config and its official (torch-layout) weights as float32 tensors."""
    with open_checkpoint(tiny_qwen_vl) as checkpoint:
        weights = {meta.name: torch.from_numpy(float32_from_bf16_bits(values))
                   for meta, values in checkpoint.iter_tensors()}
        return checkpoint.config, weights


def _torch_abs_pos(table: torch.Tensor, count: int) -> torch.Tensor:
    source, target = int(math.sqrt(table.size(0))), int(math.sqrt(count))
    if source == target:
        return table
    image = table.reshape(1, source, source, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(image, size=(target, target), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).flatten(0, 2)


def _torch_layer_norm(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], 1e-6)


def _torch_resampler(config: dict, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Resampler.forward: x [B, N, width] -> [B, 256, output_dim], through torch nn.MultiheadAttention."""
    p = "transformer.visual.attn_pool."
    out_dim = config["visual"]["output_dim"]
    attn = torch.nn.MultiheadAttention(out_dim, out_dim // 128)
    attn.load_state_dict({"in_proj_weight": w[p + "attn.in_proj_weight"], "in_proj_bias": w[p + "attn.in_proj_bias"],
                          "out_proj.weight": w[p + "attn.out_proj.weight"], "out_proj.bias": w[p + "attn.out_proj.bias"]})
    pos_embed = _torch_abs_pos(w[p + "pos_embed"], x.size(1))
    kv = _torch_layer_norm(F.linear(x, w[p + "kv_proj.weight"]), w, p + "ln_kv").permute(1, 0, 2)
    query = _torch_layer_norm(w[p + "query"], w, p + "ln_q")
    batch = kv.shape[1]
    out = attn(query.unsqueeze(1).repeat(1, batch, 1) + w[p + "pos_embed"].unsqueeze(1), kv + pos_embed.unsqueeze(1),
               kv, need_weights=False)[0]
    return out.permute(1, 0, 2)


def _torch_visual(config: dict, w: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """VisionTransformer.forward: pixels [B, 3, 448, 448] -> [B, 256, output_dim]."""
    visual = config["visual"]
    width, heads = visual["width"], visual["heads"]
    head_dim = width // heads
    p = "transformer.visual."
    x = F.conv2d(pixels, w[p + "conv1.weight"], stride=visual["patch_size"])
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = _torch_layer_norm(x + _torch_abs_pos(w[p + "positional_embedding"], x.size(1)), w, p + "ln_pre")
    x = x.permute(1, 0, 2)  # [seq, batch, width], as the official blocks run
    for i in range(visual["layers"]):
        b = f"{p}transformer.resblocks.{i}."
        mixed = F.linear(_torch_layer_norm(x, w, b + "ln_1"), w[b + "attn.in_proj.weight"], w[b + "attn.in_proj.bias"])
        seq, batch = mixed.shape[:2]
        q, k, v = mixed.view(seq, batch, heads, 3 * head_dim).split(head_dim, dim=-1)
        q, k, v = (t.reshape(seq, batch * heads, head_dim).transpose(0, 1) for t in (q, k, v))
        context = torch.bmm(torch.softmax(torch.bmm(q / math.sqrt(head_dim), k.transpose(1, 2)), dim=-1), v)
        context = context.view(batch, heads, seq, head_dim).permute(2, 0, 1, 3).reshape(seq, batch, width)
        x = x + F.linear(context, w[b + "attn.out_proj.weight"], w[b + "attn.out_proj.bias"])
        hidden = F.gelu(F.linear(_torch_layer_norm(x, w, b + "ln_2"), w[b + "mlp.c_fc.weight"], w[b + "mlp.c_fc.bias"]))
        x = x + F.linear(hidden, w[b + "mlp.c_proj.weight"], w[b + "mlp.c_proj.bias"])
    pooled = _torch_resampler(config, w, x.permute(1, 0, 2))
    return _torch_layer_norm(pooled, w, p + "ln_post") @ w[p + "proj"]


def _torch_qwen_logits(config: dict, w: dict[str, torch.Tensor], ids: list[int], features: torch.Tensor) -> torch.Tensor:
    """QWenLMHeadModel.forward below seq_length (no NTK, no logn), image features between <img> and </img>."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim, length, eps = hidden // heads, len(ids), config["layer_norm_epsilon"]

    def rms(x: torch.Tensor, name: str) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w[name]

    h = w["transformer.wte.weight"][torch.tensor(ids)].clone()
    start = ids.index(IMG_START)
    h[start + 1: ids.index(IMG_END)] = features
    inv_freq = 1.0 / (config["rotary_emb_base"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
    emb = torch.cat([torch.outer(torch.arange(length).float(), inv_freq)] * 2, dim=-1)
    cos, sin = emb.cos(), emb.sin()

    def rotate(x: torch.Tensor) -> torch.Tensor:
        first, second = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-second, first], dim=-1) * sin

    causal = torch.full((length, length), float("-inf")).triu(1)
    for i in range(config["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        qkv = F.linear(rms(h, p + "ln_1.weight"), w[p + "attn.c_attn.weight"], w[p + "attn.c_attn.bias"])
        q, k, v = (t.view(length, heads, head_dim).transpose(0, 1) for t in qkv.split(hidden, dim=-1))
        scores = rotate(q) @ rotate(k).transpose(1, 2) / math.sqrt(head_dim) + causal
        context = (torch.softmax(scores, dim=-1) @ v).transpose(0, 1).reshape(length, hidden)
        h = h + F.linear(context, w[p + "attn.c_proj.weight"])
        y = rms(h, p + "ln_2.weight")
        h = h + F.linear(F.linear(y, w[p + "mlp.w1.weight"]) * F.silu(F.linear(y, w[p + "mlp.w2.weight"])),
                         w[p + "mlp.c_proj.weight"])
    return F.linear(rms(h, "transformer.ln_f.weight"), w["lm_head.weight"])


def test_resize_grid_matches_torch_bicubic() -> None:
    table = np.random.default_rng(1).standard_normal((256, 24)).astype(np.float32)
    for grid in (32, 16, 24, 9):
        expected = _torch_abs_pos(torch.from_numpy(table), grid * grid).numpy()
        actual = resize_grid(paddle.to_tensor(table), grid).numpy()
        assert actual.shape == (grid * grid, 24)
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5)


def test_qwen_vl_resampler_matches_torch_multihead_attention(converted: dict[str, Path], qwen_vl_official: tuple) -> None:
    config, official = qwen_vl_official
    dims = QwenVLDims.from_config(config)
    x = np.random.default_rng(2).standard_normal((1, dims.grid**2, dims.v_width)).astype(np.float32)
    with torch.no_grad():
        expected = _torch_resampler(config, official, torch.from_numpy(x)).numpy()
    with open_checkpoint(converted["qwen_vl"], bf16=True) as checkpoint, paddle.no_grad():
        resampler = StreamedWeights(checkpoint).fill(Resampler(dims), "visual.attn_pool.")
        actual = resampler(paddle.to_tensor(x)).numpy()
    assert actual.shape == expected.shape == (1, 256, dims.out)
    assert _rel(actual, expected) <= 1e-4


def _qwen_vl_case(config: dict) -> tuple[np.ndarray, list[int]]:
    size = config["visual"]["image_size"]
    pixels = np.random.default_rng(3).standard_normal((1, 3, size, size)).astype(np.float32)
    return pixels, TEXT_IDS[:3] + [IMG_START] + [IMG_PAD] * 256 + [IMG_END] + TEXT_IDS[3:]


def test_qwen_vl_matches_torch_transcription(forward: Callable, qwen_vl_official: tuple) -> None:
    config, official = qwen_vl_official
    pixels, ids = _qwen_vl_case(config)
    with torch.no_grad():
        expected_features = _torch_visual(config, official, torch.from_numpy(pixels))[0]
        expected_logits = _torch_qwen_logits(config, official, ids, expected_features).numpy()
    paddle_forward = forward("qwen_vl", False)
    features = paddle_forward.encode_images(pixels)
    assert _rel(features, expected_features.numpy()) <= 1e-4
    image_mask = np.array([t == IMG_PAD for t in ids])
    logits = paddle_forward.logits(np.array(ids), np.arange(len(ids)), features, image_mask)
    assert logits.shape == (len(ids), config["vocab_size"])
    assert _rel(logits, expected_logits) <= 1e-4


# ---------------------------------------------------------------------------------------------------
# Streamed against resident; strictness


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen_vl"])
def test_streamed_matches_resident(family: str, forward: Callable, hf_model: Callable,
                                   qwen_vl_official: tuple) -> None:
    if family == "qwen_vl":
        pixels, id_list = _qwen_vl_case(qwen_vl_official[0])
        vision_inputs: dict[str, np.ndarray] = {}
        ids = np.array(id_list)
        positions = np.arange(len(ids))
        image_mask = ids == IMG_PAD
    else:
        model = hf_model(family)
        pixels, vision_inputs, grid = _qwen2_image(model)
        prompt = _qwen2_prompt(model)
        ids = prompt[0].numpy()
        image_mask = ids == model.config.image_token_id
        positions = model.model.get_rope_index(prompt, torch.from_numpy(image_mask[None]).int(),
                                               image_grid_thw=grid)[0][:, 0].numpy()
    resident, streamed = forward(family, False), forward(family, True)
    features = resident.encode_images(pixels, **vision_inputs)
    np.testing.assert_allclose(streamed.encode_images(pixels, **vision_inputs), features, rtol=0, atol=1e-6)
    expected = resident.logits(ids, positions, features, image_mask)
    np.testing.assert_allclose(streamed.logits(ids, positions, features, image_mask), expected, rtol=0, atol=1e-5)


def test_streamed_layers_hold_their_weights_as_stored(converted: dict[str, Path], forward: Callable) -> None:
    """A streamed decoder layer is built in the dtype its weights are stored in (bfloat16: half of float32) and
    filled with the stored bits as they are; its forward casts each weight to float32 where it uses it."""
    network = forward("qwen2_vl", True).network
    text = network.text_model()
    entry, bf16 = weights_entry(converted["qwen2_vl"])
    with open_checkpoint(entry, bf16=bf16) as checkpoint:
        weights = StreamedWeights(checkpoint)
        assert weights.stored_dtype("model.layers.0.") == "bfloat16"
        assert weights.stored_dtype("no such prefix.") == "float32"
        layer = weights.fill(built_in("bfloat16", lambda: text.stream_layer(network.dims)), "model.layers.0.")
        for key, parameter in layer.state_dict().items():
            assert parameter.dtype == paddle.bfloat16
            np.testing.assert_array_equal(parameter.numpy().view(np.uint16), checkpoint.read(f"model.layers.0.{key}"))


@pytest.fixture(scope="module")
def qwen_vl_inference(module_tmp: Callable[[str], Path], tiny_qwen_vl: Path) -> Path:
    """The tiny Qwen-VL in the paddle-inference layout (PaddleNLP's qwen.* names), float16 as
    `vlhub convert --to paddle-inference` writes it."""
    out = module_tmp("qwen-vl-inference") / "weights"
    return prepare_conversion(str(tiny_qwen_vl), to="paddle-inference", dtype="float16").write(out).out


@pytest.mark.parametrize("streamed", [False, True], ids=["resident", "streamed"])
def test_qwen_vl_paddle_inference_weights_match_the_paddlemix_ones(
    qwen_vl_inference: Path, forward: Callable, qwen_vl_official: tuple, streamed: bool,
) -> None:
    with open_checkpoint(qwen_vl_inference) as checkpoint:
        assert {"qwen.wte.weight", "qwen.h.0.attn.c_attn.weight", "visual.vit.conv1.weight"} <= set(checkpoint.tensors)
        assert {meta.dtype for meta in checkpoint.tensors.values()} == {"float16"}
    pixels, id_list = _qwen_vl_case(qwen_vl_official[0])
    ids = np.array(id_list)
    positions, image_mask = np.arange(len(ids)), ids == IMG_PAD
    paddlemix = forward("qwen_vl", False)  # the same bf16 source values, read as bf16 and computed in float32
    expected_features = paddlemix.encode_images(pixels)
    expected_logits = paddlemix.logits(ids, positions, expected_features, image_mask)
    inference = PaddleForward(qwen_vl_inference, streamed=streamed)
    try:
        features = inference.encode_images(pixels)
        logits = inference.logits(ids, positions, features, image_mask)
    finally:
        inference.close()
    for stage in (compare_arrays("vision embeddings", expected_features, features, TOLERANCES["float16"]),
                  compare_arrays("logits", expected_logits, logits, TOLERANCES["float16"], top1=True)):
        assert stage.passed, stage


@pytest.mark.parametrize("streamed", [False, True], ids=["resident", "streamed"])
def test_the_fit_check_names_the_checkpoints_own_keys(qwen_vl_inference: Path, tmp_path: Path,
                                                      streamed: bool) -> None:
    broken = _with_config(qwen_vl_inference, tmp_path / "broken",
                          lambda c: c.update(num_hidden_layers=c["num_hidden_layers"] + 1))
    with pytest.raises(CheckFailed, match=r"missing \(\d+\): qwen[.]h[.]2[.]ln_1[.]weight"):
        PaddleForward(broken, streamed=streamed)


def _with_config(converted: Path, destination: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of a converted checkpoint (weights linked, not copied) whose config.json `edit` changed."""
    destination.mkdir()
    for entry in converted.iterdir():
        if entry.name != "config.json":
            hard_link_or_copy(entry, destination / entry.name)
    config = json.loads((converted / "config.json").read_text())
    edit(config)
    (destination / "config.json").write_text(json.dumps(config))
    return destination


@pytest.mark.parametrize(("edit", "kind", "key"), [
    (lambda c: c.update(num_hidden_layers=c["num_hidden_layers"] + 1), "missing", "model.layers.2.self_attn.q_proj.weight"),
    (lambda c: c.update(tie_word_embeddings=True), "unexpected", "lm_head.weight"),
    (lambda c: c.update(intermediate_size=2 * c["intermediate_size"]), "mis-shaped", "model.layers.0.mlp.up_proj.weight"),
], ids=["missing", "unexpected", "mis-shaped"])
@pytest.mark.parametrize("streamed", [False, True], ids=["resident", "streamed"])
def test_weights_that_do_not_fit_the_config_fail_the_check(
    converted: dict[str, Path], tmp_path: Path, edit: Callable[[dict], None], kind: str, key: str, streamed: bool,
) -> None:
    broken = _with_config(converted["qwen2_vl"], tmp_path / "broken", edit)
    with pytest.raises(CheckFailed, match=rf"{kind} \(\d+\): .*{key.replace('.', '[.]')}") as caught:
        PaddleForward(broken, streamed=streamed)
    assert caught.value.exit_code == 1


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen_vl"])
def test_resident_network_exports_with_jit_save(family: str, forward: Callable, hf_model: Callable,
                                               qwen_vl_official: tuple, tmp_path: Path) -> None:
    """The resident networks trace whole (no Python branch on tensor values) and reload with the same numbers."""
    from paddle.static import InputSpec

    paddle_forward = forward(family, False)
    if family == "qwen_vl":
        pixels, _ = _qwen_vl_case(qwen_vl_official[0])
        vision_inputs: dict[str, np.ndarray] = {}
    else:
        pixels, vision_inputs, _ = _qwen2_image(hf_model(family))
    features = paddle_forward.encode_images(pixels, **vision_inputs)
    order = ("vision_position_ids", "full_mask", "window_index", "reverse_index", "window_mask")  # forward's order
    vision_args = [pixels] + [vision_inputs[name] for name in order if name in vision_inputs]
    vision_specs = [InputSpec([None, *pixels.shape[1:]], "float32")] + [
        InputSpec([None] * value.ndim, "int64" if value.dtype == np.int64 else "float32") for value in vision_args[1:]]

    length = len(TEXT_IDS) + len(features)
    image_mask = np.zeros(length, bool)
    image_mask[2:2 + len(features)] = True
    ids = np.array(TEXT_IDS[:2] + [IMG_PAD] * len(features) + TEXT_IDS[2:])
    positions = np.arange(length) if family == "qwen_vl" else np.tile(np.arange(length), (3, 1))
    text_args = [ids, positions, features, image_mask]
    text_specs = [InputSpec([None], "int64"), InputSpec([None] * positions.ndim, "int64"),
                  InputSpec([None, features.shape[1]], "float32"), InputSpec([None], "bool")]
    logits = paddle_forward.logits(*text_args)

    for layer, specs, args, expected in ((paddle_forward.net.visual, vision_specs, vision_args, features),
                                         (paddle_forward.net, text_specs, text_args, logits)):
        prefix = str(tmp_path / type(layer).__name__)
        paddle.jit.save(paddle.jit.to_static(layer, input_spec=specs, full_graph=True), prefix)
        reloaded = paddle.jit.load(prefix)
        np.testing.assert_allclose(reloaded(*map(paddle.to_tensor, args)).numpy(), expected, rtol=0, atol=1e-5)
