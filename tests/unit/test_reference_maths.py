"""The numpy reference's image preprocessing and maths on their own: patches as transformers' image processor makes
them, smart_resize, gelu and the bicubic resize against torch (the per-family forwards: tests/families/)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlhub.smoke.inputs import normalize, smart_resize, synthetic_image, vision_inputs
from vlhub.smoke.reference import bicubic_matrix, gelu, resize_grid


def test_patches_match_the_transformers_image_processor(tiny_qwen2_vl: Path) -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image = synthetic_image(224, 336)
    processed = Qwen2VLImageProcessorPil()(images=[Image.fromarray(image)], return_tensors="np")
    ours = vision_inputs([normalize(image)], {"model_type": "qwen2_vl", "vision_config": {}})
    assert ours.grids == [tuple(processed["image_grid_thw"][0])]
    np.testing.assert_allclose(ours.pixel_values, processed["pixel_values"], atol=1e-5)


@pytest.mark.parametrize("size", [(1080, 1920), (448, 448), (224, 224), (100, 100), (28, 28), (4000, 6000),
                                  (333, 517), (30, 1000)])
def test_smart_resize_matches_transformers(size: tuple[int, int]) -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as theirs

    assert smart_resize(*size) == theirs(*size, max_pixels=16384 * 28 * 28)


def test_gelu_and_bicubic_match_torch() -> None:
    x = np.linspace(-8, 8, 100001, dtype=np.float32)
    np.testing.assert_allclose(gelu(x), torch.nn.functional.gelu(torch.from_numpy(x)).numpy(), atol=2e-6)
    table = np.random.default_rng(0).standard_normal((256, 6)).astype(np.float32)
    for side in (32, 20, 9):
        grid = torch.from_numpy(table).reshape(1, 16, 16, 6).permute(0, 3, 1, 2)
        theirs = torch.nn.functional.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
        np.testing.assert_allclose(resize_grid(table, side * side),
                                   theirs.permute(0, 2, 3, 1).reshape(-1, 6).numpy(), atol=1e-5)
    assert bicubic_matrix(16, 16) @ np.arange(16, dtype=np.float32) == pytest.approx(np.arange(16))
