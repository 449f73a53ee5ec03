"""Qwen3.5's checkpoints in every form a user may hold, judged by transformers: the built-in tiny models (official
names, which transformers loads with nothing missing or left over), a mixture-of-experts model as transformers 5
saves it (one expert at a time), fused as the official files hold it and fused the other way round; the
multi-token-prediction head the releases carry (dropped, and said so); the catalog's sizes and the releases and
configs vlhub refuses, each in one line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.families.qwen3_5_models import build, in_float64, logits64
from tests.helpers import one_line_error, relative_error, run_vlhub
from vlhub.catalog import get_model, models
from vlhub.hub.sources import resolve_source
from vlhub.smoke.reference import ReferenceForward
from vlhub.smoke.weights import ModelWeights

MTP = {"mtp.fc.weight": (64, 128), "mtp.pre_fc_norm_embedding.weight": (64,), "mtp.pre_fc_norm_hidden.weight": (64,),
       "mtp.layers.0.self_attn.q_proj.weight": (256, 64), "mtp.layers.0.mlp.experts.3.up_proj.weight": (24, 64),
       "mtp.norm.weight": (64,)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A tiny Qwen3.5 MoE as transformers 5 saves it (its experts one at a time), and the model."""
    model = build("moe", seed=2)
    directory = tmp_path_factory.mktemp("saved")
    model.save_pretrained(directory)
    return directory, model


@pytest.mark.parametrize("name", ["tiny-qwen3.5", "tiny-qwen3.5-moe"])
def test_the_built_in_tiny_models_are_what_transformers_loads(name: str) -> None:
    """Every tensor transformers' model has, none it does not (the official names), and the reference computes
    its logits."""
    import transformers

    directory = resolve_source(name)
    model, info = transformers.AutoModelForImageTextToText.from_pretrained(directory, output_loading_info=True,
                                                                          dtype=torch.float32)
    assert not any(info.values()), info
    assert type(model).__name__ == ("Qwen3_5MoeForConditionalGeneration" if name.endswith("moe")
                                    else "Qwen3_5ForConditionalGeneration")
    ids = np.arange(5, 30)
    with ModelWeights.open(directory) as weights:
        ours = ReferenceForward(weights).logits(ids, np.broadcast_to(np.arange(len(ids)), (3, len(ids))))
    assert relative_error(ours, logits64(in_float64(model.eval()), input_ids=torch.from_numpy(ids)[None])) < 1e-4


@pytest.mark.parametrize("form", ["per-expert", "official", "experts-transposed"])
def test_every_moe_form_converts_to_the_official_one(saved, form: str, tmp_path: Path) -> None:
    """transformers' own save (one expert at a time), the fused official tensors and the fused ones turned round
    all convert to the official fused form, which transformers loads to the model it saved."""
    import transformers

    directory, model = saved
    source = tmp_path / "source"
    if form == "per-expert":
        shutil.copytree(directory, source)
    else:
        source.mkdir()
        state = {name: (t.transpose(1, 2) if form == "experts-transposed" and name.endswith("_proj") and t.ndim == 3
                        else t).contiguous() for name, t in model.state_dict().items()}
        save_file(state, source / "model.safetensors", metadata={"format": "pt"})
        shutil.copy(directory / "config.json", source / "config.json")
    result = run_vlhub("convert", str(source), "--to", "safetensors", "--out", str(tmp_path / "out"), "--no-smoke")
    assert result.returncode == 0, result.stderr
    written = {}
    for shard in (tmp_path / "out").glob("*.safetensors"):
        written.update(load_file(shard))
    experts = written["model.language_model.layers.1.mlp.experts.gate_up_proj"]
    assert tuple(experts.shape) == (6, 48, 64)  # [experts, gate | up, hidden], as transformers holds them
    assert not any(".experts.0." in name for name in written)
    loaded = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "out", dtype=torch.float32)
    # the rotary settings in the official spelling (rope_parameters), read back as transformers wrote them
    assert json.loads((tmp_path / "out" / "config.json").read_text())["text_config"]["rope_parameters"] == \
        model.config.text_config.rope_parameters == loaded.config.text_config.rope_parameters
    assert loaded.config.text_config.layer_types == model.config.text_config.layer_types
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_the_multi_token_prediction_head_is_dropped_and_said_so(saved, tmp_path: Path) -> None:
    directory, _ = saved
    source = shutil.copytree(directory, tmp_path / "source")
    shard = next(source.glob("*.safetensors"))
    tensors = load_file(shard)
    tensors.update({name: torch.zeros(shape) for name, shape in MTP.items()})
    save_file(tensors, shard, metadata={"format": "pt"})
    (source / "model.safetensors.index.json").unlink(missing_ok=True)
    plan = run_vlhub("convert", str(source), "--to", "safetensors", "--dry-run", "--json")
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["ops"]["drop"] == len(MTP)
    result = run_vlhub("convert", str(source), "--to", "paddle", "--out", str(tmp_path / "out"), "--no-smoke")
    assert result.returncode == 0, result.stderr
    written = [name for shard in (tmp_path / "out").glob("*.safetensors") for name in load_file(shard)]
    assert written and not any(name.startswith("mtp.") for name in written)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda text: text.update(layer_types=text["layer_types"][:-1]), "layer_types is .*a list of 4 entries"),
    (lambda text: text["layer_types"].__setitem__(0, "sliding_attention"), "each one of 'full_attention'"),
    (lambda text: text.update(linear_num_key_heads=3), ("linear_num_value_heads 4 is not a multiple of "
                                                        "linear_num_key_heads 3")),
    (lambda text: text.update(linear_conv_kernel_dim=100), "linear_conv_kernel_dim is 100"),
])
def test_a_config_the_hybrid_decoder_cannot_take_is_refused_in_one_line(edit, message: str, tmp_path: Path) -> None:
    source = shutil.copytree(resolve_source("tiny-qwen3.5"), tmp_path / "source")
    config = json.loads((source / "config.json").read_text())
    edit(config["text_config"])
    (source / "config.json").write_text(json.dumps(config))
    line = one_line_error(run_vlhub("convert", str(source), "--to", "safetensors", "--dry-run"))
    assert re.search(message, line), line


def test_the_catalog_has_every_released_size_and_refuses_the_fp8_ones() -> None:
    catalog = {name: spec for name, spec in models().items() if spec.family.name == "qwen3_5" and not spec.tiny}
    sizes = ["0.8b", "2b", "4b", "9b", "27b", "35b-a3b", "122b-a10b", "397b-a17b"]
    assert sorted(catalog) == sorted([f"qwen3.5-{s}" for s in sizes] +
                                     [f"qwen3.5-{s}-fp8" for s in ("27b", "35b-a3b", "122b-a10b", "397b-a17b")])
    # the release's own config: 0.8B is tied; the published ones are untied (docs/facts/qwen3.md, "Released sizes")
    assert get_model("Qwen/Qwen3.5-0.8B").tie_word_embeddings
    assert not any(catalog[f"qwen3.5-{s}"].tie_word_embeddings for s in ("27b", "35b-a3b", "397b-a17b"))
    for size, billions in zip(sizes, (0.8, 2, 4, 9, 27, 35, 122, 397)):
        assert 0.85 * billions < catalog[f"qwen3.5-{size}"].params / 1e9 < 1.2 * billions, size
    line = one_line_error(run_vlhub("convert", "qwen3.5-397b-a17b-fp8", "--to", "safetensors"))
    assert "FP8 release" in line and "Qwen/Qwen3.5-397B-A17B-FP8" in line
