"""`vlhub plan`'s arithmetic, computed by hand for every catalog model (the command's output and errors: tests/cli/test_plan.py).

Every expected number below is worked out in the comments beside it, not taken from the code under test.
smart_resize (docs/facts/qwen-keys.md#smart-resize), factor 28, default bounds 3136..12845056:
    round each side to a multiple of 28; if the area passes max_pixels, floor each side / beta (beta =
    sqrt(h*w / max_pixels)); if it is under min_pixels, ceil each side * beta (beta = sqrt(min_pixels / (h*w))).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.helpers import plan_max_seq_len as max_seq_len
from tests.helpers import plan_tpu as tpu
from tests.helpers import plan_vamc as vamc
from vlhub.catalog import models
from vlhub.convert.configs import official_config
from vlhub.errors import UserError
from vlhub.family_registry import FAMILIES
from vlhub.plan import make_plan
from vlhub.sizes import max_pixels_for, plan_inputs
from vlhub.targets.vamc.build import vamc_options
from vlhub.targets.vamc.plan import MAX_VAMC_PATCHES, visual_output_split

IMAGES = [(1280, 720), (1920, 1080), (448, 448), (200, 5000), (20, 20)]  # width x height
# (resized HxW, grid t,h,w, patches, tokens) for Qwen2-VL and Qwen2.5-VL (14-pixel patches, 2x2 merge)
QWEN2_INPUTS = [
    # 720p: 720/28 = 25.71 -> 26 -> 728, 1280/28 = 45.71 -> 46 -> 1288; 937664 pixels, within the bounds
    ((728, 1288), (1, 52, 92), 4784, 1196),
    # 1080p: 1080/28 = 38.57 -> 39 -> 1092, 1920/28 = 68.57 -> 69 -> 1932; 2109744 pixels
    ((1092, 1932), (1, 78, 138), 10764, 2691),
    # 448/28 = 16 exactly
    ((448, 448), (1, 32, 32), 1024, 256),
    # tall: 5000/28 = 178.57 -> 179 -> 5012, 200/28 = 7.14 -> 7 -> 196; 982352 pixels; 358 x 14 patches
    ((5012, 196), (1, 358, 14), 5012, 1253),
    # tiny: 28x28 = 784 < 3136, beta = sqrt(3136/400) = 2.8, ceil(20 * 2.8 / 28) = 2 -> 56x56
    ((56, 56), (1, 4, 4), 16, 4),
]
# the largest of the five is 1080p: N = 10764 -> 673 * 16 = 10768; prefill 2691 + 128 = 2819 -> 177 * 16 = 2832;
# max context 2832 + 512 = 3344 (209 * 16); vamc max_pixels 10768 * 14 * 14 = 2110528
QWEN2_SIZES = (10768, 2832, 3344)
# Qwen-VL: every image is 448x448, 32x32 patches, the resampler's 256 tokens; N = 1024 (64 * 16); prefill
# 256 + 128 = 384; max context 384 + 512 = 896
QWEN_VL_SIZES = (1024, 384, 896)

# name: family, the vamc output split of the language model's width, max_position_embeddings
MODELS = {
    "qwen-vl-7b": ("qwen_vl", None, 8192),
    "qwen-vl-chat-7b": ("qwen_vl", None, 8192),
    "tiny-qwen-vl": ("qwen_vl", None, 8192),
    "qwen2-vl-2b": ("qwen2_vl", [640, 640, 256], 32768),  # 1536 = 2 x 640 + 256
    "qwen2-vl-7b": ("qwen2_vl", [640] * 5 + [384], 32768),  # 3584 = 5 x 640 + 384
    "qwen2-vl-72b": ("qwen2_vl", [640] * 12 + [512], 32768),  # 8192 = 12 x 640 + 512
    "tiny-qwen2-vl": ("qwen2_vl", [128], 32768),  # 128 < 640: one chunk
    "qwen2.5-vl-3b": ("qwen2_5_vl", [640, 640, 640, 128], 128000),  # 2048 = 3 x 640 + 128
    "qwen2.5-vl-7b": ("qwen2_5_vl", [640] * 5 + [384], 128000),
    "qwen2.5-vl-32b": ("qwen2_5_vl", [640] * 8, 128000),  # 5120 = 8 x 640
    "qwen2.5-vl-72b": ("qwen2_5_vl", [640] * 12 + [512], 128000),
    "tiny-qwen2.5-vl": ("qwen2_5_vl", [128], 128000),
    # Qwen3-VL: no vamc route (VastAI serves it through vllm_vacc), max_position_embeddings 262144
    **{name: ("qwen3_vl", None, 262144) for name in models() if name.startswith(("qwen3-vl", "tiny-qwen3-vl"))},
    # Qwen3.5: Qwen3-VL's processor, no vamc route, max_position_embeddings 262144
    **{name: ("qwen3_5", None, 262144) for name in models() if name.startswith(("qwen3.5", "tiny-qwen3.5"))},
}
# Qwen3-VL: 16-pixel patches, factor 32, its published bounds 65536..16777216 (preprocessor_config.json
# size.shortest_edge / longest_edge, docs/facts/qwen3.md#processor)
QWEN3_INPUTS = [
    # 720p: 720/32 = 22.5 -> round half to even 22 -> 704, 1280/32 = 40 -> 1280; 901120 pixels, within the bounds
    ((704, 1280), (1, 44, 80), 3520, 880),
    # 1080p: 1080/32 = 33.75 -> 34 -> 1088, 1920/32 = 60 -> 1920; 2088960 pixels
    ((1088, 1920), (1, 68, 120), 8160, 2040),
    # 448/32 = 14 exactly; 200704 pixels >= 65536
    ((448, 448), (1, 28, 28), 784, 196),
    # tall: 5000/32 = 156.25 -> 156 -> 4992, 200/32 = 6.25 -> 6 -> 192; 958464 pixels; 312 x 12 patches
    ((4992, 192), (1, 312, 12), 3744, 936),
    # tiny: 32x32 = 1024 < 65536, beta = sqrt(65536 / 400) = 12.8, ceil(20 * 12.8 / 32) = 8 -> 256x256
    ((256, 256), (1, 16, 16), 256, 64),
]
# the largest is 1080p: N = 8160 (510 * 16); prefill 2040 + 128 = 2168 -> 2176 (136 * 16); max context
# 2176 + 512 = 2688 (168 * 16)
QWEN3_SIZES = (8160, 2176, 2688)


def test_every_catalog_model_has_a_hand_computed_case() -> None:
    assert set(MODELS) == set(models())


@pytest.mark.parametrize("name", MODELS)
def test_catalog_model(name: str) -> None:
    family, split, limit = MODELS[name]
    plan = make_plan(name, images=IMAGES)
    assert plan.family == family and plan.sizes.position_limit == limit and plan.refits == (None,) * 5
    got = [(item.resized, item.grid, item.patches, item.tokens) for item in plan.inputs]
    sizes = (plan.sizes.visual_patches, plan.sizes.prefill_length, plan.sizes.max_length)
    if family == "qwen_vl":
        assert got == [((448, 448), (1, 32, 32), 1024, 256)] * 5 and sizes == QWEN_VL_SIZES
        assert (plan.min_pixels, plan.max_pixels) == (None, None)
        assert vamc(plan) is None and tpu(plan) is None and max_seq_len(plan) == 896
        return
    if family in ("qwen3_vl", "qwen3_5"):
        assert got == QWEN3_INPUTS and sizes == QWEN3_SIZES
        assert (plan.min_pixels, plan.max_pixels) == (65536, 16777216) and vamc(plan) is None
        # llm_convert: the largest input's own size, W,H = 1920,1088 (its multiples of 32)
        if models()[name].config["model_type"] == "qwen3_vl_moe":  # llm_convert has no qwen3_vl_moe
            assert tpu(plan) is None
        else:
            assert (tpu(plan).max_pixels, tpu(plan).seq_length) == ((1920, 1088), 2688)
            assert (tpu(plan).vision_patches, tpu(plan).vision_tokens) == (8160, 2040)
        return
    assert got == QWEN2_INPUTS and sizes == QWEN2_SIZES and (plan.min_pixels, plan.max_pixels) == (3136, 12845056)
    assert vamc(plan) is not None and vamc(plan).to_json() == {
        "visual_patches": 10768, "given": False, "max_pixels": 2110528, "input_ids": [[2832], [3344]],
        "output_split": split}
    # llm_convert: the largest input's own size, W,H = 1932,1092: 69 x 39 squares of 4 patches = 10764
    assert tpu(plan) is not None
    assert (tpu(plan).max_pixels, tpu(plan).seq_length) == ((1932, 1092), 3344)
    assert (tpu(plan).vision_patches, tpu(plan).vision_tokens) == (10764, 2691)
    assert max_seq_len(plan) == 3344


def test_video_frames_pair_up() -> None:
    # 640x360 frames: 360/28 = 12.86 -> 13 -> 364, 640/28 = 22.86 -> 23 -> 644; 26 x 46 patches a frame pair
    plan = make_plan("qwen2-vl-2b", video=(640, 360, 8))
    (item,) = plan.inputs
    assert (item.resized, item.grid, item.patches, item.tokens) == ((364, 644), (4, 26, 46), 4784, 1196)
    assert item.label == "video 640x360, 8 frames"
    # 9 frames: ceil(9 / 2) = 5 steps, 5 x 26 x 46 = 5980 patches, 1495 tokens
    (odd,) = plan_inputs(models()["qwen2-vl-2b"].config, video=(640, 360, 9))
    assert (odd.grid, odd.patches, odd.tokens) == ((5, 26, 46), 5980, 1495)
    # tpu-mlir: 1196 squares of 28 pixels, near-square: 35 across (34^2 = 1156 < 1196), ceil(1196 / 35) = 35 down
    assert tpu(plan) is not None and tpu(plan).max_pixels == (980, 980)
    assert tpu(plan).vision_patches == 4900  # 70 x 70 patches >= 4784


def test_given_patches_refit_images_and_videos() -> None:
    # 720p within 921600: 937664 > 921600, beta = sqrt(921600 / 921600) = 1: floor(25.71) = 25 -> 700,
    # floor(45.71) = 45 -> 1260; 50 x 90 = 4500 patches, 1125 tokens. The video's frames stay 364x644 (234416 <
    # 921600): 4784 patches, 1196 tokens, the largest: N 4784, prefill 1196 + 128 = 1324 -> 1328, max 1840
    plan = make_plan("qwen2-vl-7b", images=[(1280, 720)], video=(640, 360, 8), max_pixels=921600, patches=4096)
    image, video = plan.inputs
    assert (image.resized, image.patches, image.tokens) == ((700, 1260), 4500, 1125) and video.patches == 4784
    assert (plan.sizes.visual_patches, plan.sizes.prefill_length, plan.sizes.max_length) == (4784, 1328, 1840)
    assert vamc(plan) is not None and (vamc(plan).visual_patches, vamc(plan).given) == (4096, True)
    assert vamc(plan).max_pixels == 802816  # 4096 x 196
    # at 802816: beta = sqrt(921600 / 802816) = 960 / 896: 720 * 896 / 960 / 28 = 24 -> 672,
    # 1280 * 896 / 960 / 28 = 42.67 -> 42 -> 1176; 48 x 84 = 4032 patches
    image_refit, video_refit = plan.refits
    assert image_refit is not None and image_refit.max_pixels == 802816
    assert (image_refit.input.resized, image_refit.input.grid, image_refit.input.patches) == ((672, 1176), (1, 48, 84),
                                                                                             4032)
    # the video (4 x 26 x 46 = 4784 > 4096): each of 4 steps gets 4096 / 4 = 1024 patches = 200704 pixels;
    # 364 x 644 = 234416 > 200704, beta = sqrt(230400 / 200704) = 15 / 14: 360 * 14 / 15 / 28 = 12 -> 336,
    # 640 * 14 / 15 / 28 = 21.33 -> 21 -> 588; 4 x 24 x 42 = 4032 patches
    assert video_refit is not None and video_refit.max_pixels == 200704
    assert (video_refit.input.resized, video_refit.input.patches) == ((336, 588), 4032)


def test_narrow_image_gets_a_square_tpu_budget() -> None:
    # 20x4000 (ratio 200, the most allowed): 4000/28 = 142.86 -> 143 -> 4004, 20/28 -> at least 28; 286 x 2
    # patches = 572, 143 tokens. llm_convert wants sides of at least 56: 143 squares, 12 across (11^2 = 121 < 143),
    # ceil(143 / 12) = 12 down -> 336,336, 24 x 24 = 576 patches
    plan = make_plan("tiny-qwen2-vl", images=[(20, 4000)], target="tpu-mlir")
    (item,) = plan.inputs
    assert (item.resized, item.grid, item.patches, item.tokens) == ((4004, 28), (1, 286, 2), 572, 143)
    assert tpu(plan) is not None and tpu(plan).max_pixels == (336, 336)
    assert tpu(plan).vision_patches == 576 and vamc(plan) is None and max_seq_len(plan) is None


def test_min_and_max_pixels_bound_the_resize() -> None:
    config = models()["qwen2.5-vl-7b"].config
    # min 200704 (256 tokens): 448x448 already has it; 100x100 -> 112x112 = 12544 < 200704, beta = sqrt(20.07) =
    # 4.48: ceil(100 * 4.48 / 28) = 16 -> 448
    small, exact = plan_inputs(config, [(100, 100), (448, 448)], min_pixels=200704)
    assert small.resized == exact.resized == (448, 448)
    # max 200704 for 1080p: beta = sqrt(2073600 / 200704) = 3.214: floor(1080 / 3.214 / 28) = 12 -> 336,
    # floor(1920 / 3.214 / 28) = 21 -> 588
    (large,) = plan_inputs(config, [(1920, 1080)], max_pixels=200704)
    assert (large.resized, large.patches) == ((336, 588), 1008)


def test_max_pixels_for_and_output_split() -> None:
    config = models()["qwen2-vl-7b"].config
    assert max_pixels_for(config, 4096) == 802816  # 4096 x 14 x 14
    assert max_pixels_for(config, 5120) == 1003520  # the VastModelZOO README's 14 x 14 x 4 x 1280
    assert visual_output_split(3584) == [640] * 5 + [384]
    assert visual_output_split(2048) == [640] * 3 + [128]
    assert visual_output_split(1536) == [640, 640, 256]
    assert visual_output_split(1280) == [640, 640]
    assert visual_output_split(3584, chunk=1024) == [1024, 1024, 1024, 512]


def test_position_limits() -> None:
    # 1280x720 video, 64 frames: 32 x 52 x 92 = 153088 patches, 38272 tokens > 32768 positions
    with pytest.raises(UserError, match="38912 positions.*32768"):
        make_plan("qwen2-vl-7b", video=(1280, 720, 64))
    # Qwen-VL's static graph stops at seq_length 2048: 384 + 2000 = 2384 -> 2384 (149 x 16) > 2048; named, the
    # target refuses; unnamed, the plan keeps its arithmetic and says why no target takes it
    with pytest.raises(UserError, match="2384 positions pass Qwen-VL's seq_length 2048"):
        make_plan("qwen-vl-7b", images=[(448, 448)], answer_tokens=2000, target="paddle-inference")
    plan = make_plan("qwen-vl-7b", images=[(448, 448)], answer_tokens=2000)
    assert not plan.targets and "2384 positions pass Qwen-VL's seq_length 2048" in plan.unavailable["paddle-inference"]


def test_local_checkpoint_directory(tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    local = make_plan(str(tiny_qwen2_vl), images=[(1280, 720)])
    catalog = make_plan("tiny-qwen2-vl", images=[(1280, 720)])
    assert (local.inputs, local.sizes, vamc(local), tpu(local)) == (catalog.inputs, catalog.sizes, vamc(catalog),
                                                                       tpu(catalog))
    save_file({"x": np.zeros(1, dtype=np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match="no config.json"):
        make_plan(str(tmp_path), images=[(1280, 720)])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="'llama' is not a Qwen-VL family model"):
        make_plan(str(tmp_path), images=[(1280, 720)])


def test_given_patches_size_the_vamc_prefill() -> None:
    plan = make_plan("qwen2-vl-7b", images=[(1280, 720)], patches=5120)
    # the inputs' sizes stay the image's: 1196 + 128 = 1324 -> 1328; + 512 = 1840
    assert (plan.sizes.prefill_length, plan.sizes.max_length) == (1328, 1840)
    # vamc's LLM holds the 5120 / 4 = 1280 tokens N gives: 1280 + 128 = 1408; + 512 = 1920
    assert vamc(plan) is not None and (vamc(plan).prefill_length, vamc(plan).max_length) == (1408, 1920)
    assert plan.command("vamc") == ("vlhub convert qwen2-vl-7b --to vamc --max-pixels 1003520 --prefill-len 1408 "
                                    "--max-len 1920")


@pytest.mark.parametrize("image", ["1280x720", "1920x1080", "640x480", "200x5000"])
def test_plan_and_convert_size_vamc_alike(image: str) -> None:
    width, height = map(int, image.split("x"))
    plan = make_plan("qwen2-vl-7b", images=[(width, height)], target="vamc")
    config = official_config(models()["qwen2-vl-7b"].config)
    assert vamc(plan) is not None
    if vamc(plan).visual_patches > MAX_VAMC_PATCHES:  # 1080p: 10764 patches at the processor's bounds
        with pytest.raises(UserError, match=f"vlhub builds N up to {MAX_VAMC_PATCHES}"):
            vamc_options(FAMILIES["qwen2_vl"], config, image=(image,))
        return
    options = vamc_options(FAMILIES["qwen2_vl"], config, image=(image,))
    assert (options.visual_patches, options.max_pixels, options.prefill_length, options.max_length) == (
        vamc(plan).visual_patches, vamc(plan).max_pixels, vamc(plan).prefill_length, vamc(plan).max_length)
