"""The streamed weights of the smoke test's reference: products decoded block by block on the cores' threads, tensors
mapped from the page cache with the next layer read ahead, and one BLAS thread while inside."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import vlhub.smoke.weights as weights_module
from vlhub.errors import CorruptCheckpoint
from vlhub.formats.tensors import float32_from_bf16_bits
from vlhub.smoke.weights import ModelWeights, _openblas_threads, one_blas_thread, products


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("tokens", [1, 5])
def test_products_equal_the_whole_product(monkeypatch: pytest.MonkeyPatch, dtype: str, tokens: int) -> None:
    monkeypatch.setattr(weights_module, "_LINEAR_BLOCK_BYTES", 3 * 4 * 24)  # 3 rows a block: many blocks, a short one
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((31, 24)).astype(np.float32)
    stored = _bf16_bits(weight) if dtype == "bfloat16" else weight.astype(dtype)
    decoded = float32_from_bf16_bits(stored) if dtype == "bfloat16" else stored.astype(np.float32)
    x = rng.standard_normal((tokens, 24)).astype(np.float32)
    np.testing.assert_allclose(products(x, stored, dtype), x @ decoded.T, rtol=1e-5, atol=1e-5)


def test_streamed_linear_equals_resident(monkeypatch: pytest.MonkeyPatch, tiny_qwen2_vl: Path) -> None:
    """Every 2-D weight through `linear`, the lm_head as a table read in blocks of rows too."""
    monkeypatch.setattr(weights_module, "_WHOLE_BYTES", 1 << 12)
    monkeypatch.setattr(weights_module, "_TABLE_ROWS", 7)
    with ModelWeights.open(tiny_qwen2_vl) as streamed, ModelWeights.open(tiny_qwen2_vl, resident=True) as resident:
        names = [step.target.name for step in streamed.plan.steps if len(step.target.shape) == 2]
        assert "lm_head.weight" in names or any("embed" in name for name in names)
        for name in names:
            x = np.random.default_rng(1).standard_normal((3, resident.get(name).shape[1])).astype(np.float32)
            np.testing.assert_allclose(streamed.linear(x, name), resident.linear(x, name), rtol=1e-5, atol=1e-5)


def test_mapped_tensors_read_the_next_layer_ahead(monkeypatch: pytest.MonkeyPatch, tiny_qwen2_vl: Path) -> None:
    asked: list[int] = []
    want = weights_module.MappedTensors._want
    monkeypatch.setattr(weights_module.MappedTensors, "_want", lambda self, spans: (asked.append(len(spans)),
                                                                                    want(self, spans)))
    with ModelWeights.open(tiny_qwen2_vl) as weights:
        layer = [step.target.name for step in weights.plan.steps if step.target.name.startswith("model.layers.0.")]
        for name in layer:  # the tensors as the checkpoint reads them, read-only views of the page cache
            stored = weights._read(name)
            assert not stored.flags.writeable
            np.testing.assert_array_equal(stored, weights.checkpoint.read(weights._steps[name].source.name))
        weights._mapped._thread.submit(lambda: None).result()  # what was read ahead is done
    # the first tensor of layer 0 had all of layer 1 read ahead, once
    assert asked == [len(layer)]


def test_the_experts_are_not_read_ahead(module_tmp) -> None:
    """A mixture's experts are read one chosen expert at a time: reading a whole layer's ahead would read every
    expert (4.8 GB a layer at 235B-A22B) for each token. Stacked ([experts, ., .]) and one entry per expert."""
    from vlhub.catalog import get_model
    from vlhub.hub.synthetic import write_synthetic_checkpoint

    spec = get_model("tiny-qwen3-vl-moe")
    for layout in ("official", "per-expert"):
        path = write_synthetic_checkpoint(module_tmp(layout) / "model", spec.family, spec.config,
                                          layout=spec.family.keymap.layout(layout))
        with ModelWeights.open(path) as weights:
            layer = weights._mapped._groups["model.language_model.layers.1."]
            assert layer and not any("experts" in name for name in layer), layout
            assert any("mlp.gate" in name for name in layer)  # the router is read ahead with the rest


def test_one_blas_thread_puts_the_count_back() -> None:
    _, count = _openblas_threads()
    if count is None:
        pytest.skip("numpy's BLAS here is not OpenBLAS")
    before = count()
    with one_blas_thread():
        assert count() == 1
    assert count() == before


def test_a_weight_file_shorter_than_its_header_says_is_named_in_one_line(tmp_path: Path, tiny_qwen2_vl: Path) -> None:
    """Truncated after its header was read (another program, a copy that stopped): the mapped read says which file
    and how many bytes are missing, as every other read does, instead of mmap's bare ValueError."""
    for path in tiny_qwen2_vl.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    with ModelWeights.open(tmp_path) as weights:
        last = max(weights.plan.steps, key=lambda step: weights.checkpoint.stored_bytes(step.source.name).offset)
        span = weights.checkpoint.stored_bytes(last.source.name)
        with open(span.path, "r+b") as file:
            file.truncate(span.offset + span.length // 2)
        with pytest.raises(CorruptCheckpoint, match=f"file ends {span.length - span.length // 2} bytes early"):
            weights._read(last.target.name)
