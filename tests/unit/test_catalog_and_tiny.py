"""The catalog's official figures and the built-in tiny models' official layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vlhub.catalog import find_model, get_model, models
from vlhub.errors import UserError
from vlhub.formats.readers import open_checkpoint

OFFICIAL = ["qwen-vl-7b", "qwen-vl-chat-7b", "qwen2-vl-2b", "qwen2-vl-7b", "qwen2-vl-72b",
            "qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen2.5-vl-32b", "qwen2.5-vl-72b",
            *(f"qwen3-vl-{size}{edition}" for size in ("2b", "4b", "8b", "32b", "30b-a3b", "235b-a22b")
              for edition in ("", "-thinking")),
            "qwen3-vl-30b-a3b-fp8", "qwen3-vl-30b-a3b-thinking-fp8", "qwen3-vl-235b-a22b-thinking-fp8",
            *(f"qwen3.5-{size}" for size in ("0.8b", "2b", "4b", "9b", "27b", "35b-a3b", "122b-a10b", "397b-a17b")),
            *(f"qwen3.5-{size}-fp8" for size in ("27b", "35b-a3b", "122b-a10b", "397b-a17b"))]
TINY = ["tiny-qwen-vl", "tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-qwen3-vl-moe", "tiny-qwen3.5",
        "tiny-qwen3.5-moe"]


def test_catalog_lists_the_official_models_then_the_tiny_ones() -> None:
    assert list(models()) == OFFICIAL + TINY


@pytest.mark.parametrize(
    ("name", "billions", "tied"),
    # parameter counts published for the official checkpoints (docs/facts/qwen-keys.md#configs)
    [("qwen2-vl-2b", 2.209, True), ("qwen2-vl-7b", 8.291, False), ("qwen2-vl-72b", 73.41, False),
     ("qwen2.5-vl-3b", 3.755, True), ("qwen2.5-vl-7b", 8.292, False), ("qwen2.5-vl-32b", 33.45, False),
     ("qwen2.5-vl-72b", 73.41, False), ("qwen-vl-7b", 9.66, False),
     # the Hub model pages of Qwen3-VL-4B, -8B and -30B-A3B-Instruct (safetensors parameters)
     ("qwen3-vl-4b", 4.438, True), ("qwen3-vl-8b", 8.767, False), ("qwen3-vl-30b-a3b", 31.07, False)],
)
def test_parameter_counts_match_the_official_checkpoints(name: str, billions: float, tied: bool) -> None:
    spec = get_model(name)
    assert spec.params / 1e9 == pytest.approx(billions, rel=5e-4)
    assert spec.size_bytes == 2 * spec.params and spec.tie_word_embeddings is tied


def test_qwen2_vl_7b_matches_its_published_shard_total() -> None:
    # the five official shards add up to 16.57 GB (docs/facts/qwen-keys.md#config-qwen2-vl)
    assert get_model("qwen2-vl-7b").size_bytes / 1e9 == pytest.approx(16.57, abs=0.02)


def test_repo_ids_and_short_names_name_the_same_model() -> None:
    assert get_model("Qwen/Qwen2.5-VL-7B-Instruct").name == "qwen2.5-vl-7b"
    assert get_model("qwen/qwen-vl-chat").name == "qwen-vl-chat-7b"
    assert find_model("llava-7b") is None
    with pytest.raises(UserError, match="did you mean .*qwen2-vl-7b"):
        get_model("qwen2-vl-8b")


@pytest.mark.parametrize(
    ("fixture", "name", "index", "count"),
    [("tiny_qwen2_vl", "tiny-qwen2-vl", "model.safetensors.index.json", 58),
     ("tiny_qwen2_5_vl", "tiny-qwen2.5-vl", "model.safetensors.index.json", 56),
     ("tiny_qwen_vl", "tiny-qwen-vl", "pytorch_model.bin.index.json", 61)],
)
def test_tiny_models_are_in_the_official_layout(request: pytest.FixtureRequest, fixture: str, name: str,
                                                index: str, count: int) -> None:
    directory: Path = request.getfixturevalue(fixture)
    spec = get_model(name)
    assert json.loads((directory / "config.json").read_text()) == spec.config
    weight_map = json.loads((directory / index).read_text())["weight_map"]
    assert len(set(weight_map.values())) >= 2
    with open_checkpoint(directory) as checkpoint:
        assert len(checkpoint.tensors) == count
        assert {m.dtype for m in checkpoint.tensors.values()} == {"bfloat16"}
        expected = dict(spec.family.official_tensors(spec.config))
        assert {n: m.shape for n, m in checkpoint.tensors.items()} == expected
        assert ("lm_head.weight" in checkpoint.tensors) is not spec.tie_word_embeddings


def test_tiny_models_are_loadable_by_transformers(tiny_qwen2_vl: Path, tiny_qwen2_5_vl: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    for directory, cls in [(tiny_qwen2_vl, transformers.Qwen2VLForConditionalGeneration),
                           (tiny_qwen2_5_vl, transformers.Qwen2_5_VLForConditionalGeneration)]:
        model, info = cls.from_pretrained(directory, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        assert model.dtype == torch.bfloat16


def test_tiny_qwen_vl_shards_are_what_torch_load_reads(tiny_qwen_vl: Path) -> None:
    torch = pytest.importorskip("torch")
    with open_checkpoint(tiny_qwen_vl) as checkpoint:
        shard = checkpoint.shards[0]
        state = torch.load(tiny_qwen_vl / shard, weights_only=True)
        for name, tensor in state.items():
            assert tensor.dtype == torch.bfloat16
            assert np.array_equal(tensor.view(torch.int16).numpy().view(np.uint16), checkpoint.read(name))


def test_tiny_generation_is_deterministic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          tiny_qwen2_5_vl: Path) -> None:
    from vlhub.hub.tiny import ensure_tiny_model

    monkeypatch.setenv("VLHUB_HOME", str(tmp_path))
    again = ensure_tiny_model(get_model("tiny-qwen2.5-vl"))
    assert again != tiny_qwen2_5_vl
    for shard in tiny_qwen2_5_vl.glob("*.safetensors"):
        assert (again / shard.name).read_bytes() == shard.read_bytes()
