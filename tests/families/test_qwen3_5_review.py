"""A review of the Qwen3.5 family against transformers 5.25 (`modeling_qwen3_5.py`, `configuration_qwen3_5.py`):
configs the family's own tests do not draw (linear-attention key and value heads of different widths and counts,
full attention first or everywhere, odd image sizes), the key map's strictness per target, and the bugs the review
found, fixed: the text `hidden_act` ignored by the reference, configs that crashed with a traceback instead of one
line, `--to tpu-mlir` not saying it dropped the `mtp.*` head, and `--to tpu-mlir` taking M-RoPE sections that do not
cover the rotated dims."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from tests.families.qwen3_5_models import MOE, in_float64, logits64, qwen3_5_text, qwen3_5_vision, realistic
from tests.helpers import QWEN3_TOKENS, hf_inputs, one_line_error, relative_error, run_vlhub
from vlhub.hub.sources import resolve_source
from vlhub.keymaps import load_keymap
from vlhub.smoke.inputs import smoke_input
from vlhub.smoke.reference import ReferenceForward
from vlhub.smoke.weights import ModelWeights

FOUR = ["linear_attention"] * 3 + ["full_attention"]


def saved(directory: Path, moe: bool = False, layers: int = 4, linear: tuple[int, int, int] = (2, 4, 16),
          **text_extra: object) -> torch.nn.Module:
    """A tiny Qwen3.5 built from transformers' config classes, saved by transformers into `directory`."""
    text = qwen3_5_text(64, layers, 4, 2, 32, [2, 1, 1], linear, **text_extra, **(MOE if moe else {}))
    config_class = transformers.Qwen3_5MoeConfig if moe else transformers.Qwen3_5Config
    model_class = (transformers.Qwen3_5MoeForConditionalGeneration if moe
                   else transformers.Qwen3_5ForConditionalGeneration)
    torch.manual_seed(0)
    model = model_class(config_class(text_config=text, vision_config=qwen3_5_vision(32, 2, 2, 64),
                                     tie_word_embeddings=False, **QWEN3_TOKENS)).eval()
    realistic(model, 3)
    model.save_pretrained(directory)
    return model


def text_error(model: torch.nn.Module, directory: Path) -> float:
    ids = np.random.default_rng(1).integers(0, 380, 19)
    with ModelWeights.open(directory, resident=True) as weights:
        ours = ReferenceForward(weights).logits(ids, np.broadcast_to(np.arange(len(ids)), (3, len(ids))))
    return relative_error(ours, logits64(in_float64(model), input_ids=torch.from_numpy(ids)[None]))


def image_error(model: torch.nn.Module, directory: Path, size: tuple[int, int]) -> float:
    with ModelWeights.open(directory, resident=True) as weights:
        reference = ReferenceForward(weights)
        smoke = smoke_input(reference.config, size)
        ours = reference.logits(smoke.input_ids, smoke.position_ids, reference.encode_images(smoke),
                                smoke.image_mask)
    return relative_error(ours, logits64(in_float64(model), **hf_inputs(smoke)))


@pytest.mark.parametrize(("moe", "extra"), [
    (False, {"linear_value_head_dim": 24}),  # dk 16, dv 24
    (False, {"linear": (1, 3, 8), "linear_value_head_dim": 16}),  # one key head to three value heads, dk != dv
    (True, {"linear_value_head_dim": 8}),
    (False, {"layer_types": ["full_attention", "linear_attention", "full_attention", "linear_attention"]}),
    (False, {"layer_types": ["full_attention"] * 4}),
], ids=["dk-ne-dv", "nk-ne-nv-dk-ne-dv", "moe-dk-ne-dv", "full-first", "all-full"])
def test_the_reference_equals_transformers_on_configs_the_family_tests_do_not_draw(moe: bool, extra: dict,
                                                                                    tmp_path: Path) -> None:
    model = saved(tmp_path, moe=moe, **extra)
    assert text_error(model, tmp_path) < 1e-4
    assert image_error(model, tmp_path, (112, 168)) < 1e-4


@pytest.mark.parametrize("size", [(1, 1), (37, 3000)])
def test_the_reference_equals_transformers_on_odd_image_sizes(size: tuple[int, int], tmp_path: Path) -> None:
    model = saved(tmp_path, layer_types=FOUR)
    assert image_error(model, tmp_path, size) < 1e-4


def test_paddle_takes_unequal_linear_key_and_value_heads(tmp_path: Path) -> None:
    saved(tmp_path / "source", linear=(1, 3, 8), linear_value_head_dim=16)
    result = run_vlhub("convert", str(tmp_path / "source"), "--to", "paddle", "--out", str(tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["smoke"]["passed"]


def with_extra_tensors(tmp_path: Path, extra: dict[str, tuple[int, ...]]) -> Path:
    """tiny-qwen3.5 with tensors added to its first shard (and its index)."""
    source = shutil.copytree(resolve_source("tiny-qwen3.5"), tmp_path / "source")
    shard = min(source.glob("*.safetensors"))
    tensors = load_file(shard)
    tensors.update({name: torch.zeros(shape) for name, shape in extra.items()})
    save_file(tensors, shard, metadata={"format": "pt"})
    index = source / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"].update({name: shard.name for name in extra})
        index.write_text(json.dumps(data))
    return source


def with_text_config(tmp_path: Path, edit: Callable[[dict], object], model: str = "tiny-qwen3.5") -> Path:
    """A copy of a built-in model whose config.json's text_config `edit` changed."""
    source = shutil.copytree(resolve_source(model), tmp_path / "source")
    config = json.loads((source / "config.json").read_text())
    edit(config["text_config"])
    (source / "config.json").write_text(json.dumps(config))
    return source


@pytest.mark.parametrize("target", ["safetensors", "paddle", "tpu-mlir"])
@pytest.mark.parametrize("name", ["model.language_model.layers.0.linear_attn.foo.weight",
                                  "model.language_model.layers.0.self_attn.q_proj.weight",  # a linear layer
                                  "model.mtp.fc.weight"])
def test_a_tensor_the_key_map_does_not_know_stops_every_target_before_writing(name: str, target: str,
                                                                               tmp_path: Path) -> None:
    source = with_extra_tensors(tmp_path, {name: (4, 4)})
    line = one_line_error(run_vlhub("convert", str(source), "--to", target, "--out", str(tmp_path / "out"),
                                    "--no-smoke"))
    assert "1 unmatched" in line and name in line
    assert not (tmp_path / "out").exists()


# -- bugs found by the review


# the reference once hard-coded SiLU for the Gated DeltaNet convolution and the MLP; transformers applies
# text_config.hidden_act to both (modeling_qwen3_5.py:568, :909)
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_the_text_activation_is_read(moe: bool, tmp_path: Path) -> None:
    model = saved(tmp_path, moe=moe, hidden_act="gelu_pytorch_tanh", layer_types=FOUR)
    assert text_error(model, tmp_path) < 1e-4


def test_paddle_reads_the_text_activation(tmp_path: Path) -> None:
    saved(tmp_path / "source", hidden_act="gelu_pytorch_tanh", layer_types=FOUR)
    result = run_vlhub("convert", str(tmp_path / "source"), "--to", "paddle", "--out", str(tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["smoke"]["passed"]


def test_an_activation_the_forwards_do_not_know_is_refused_before_writing(tmp_path: Path) -> None:
    source = with_text_config(tmp_path, lambda text: text.update(hidden_act="relu2"))
    line = one_line_error(run_vlhub("convert", str(source), "--to", "safetensors", "--out", str(tmp_path / "out")))
    assert "hidden_act" in line and "relu2" in line
    assert not (tmp_path / "out").exists()


# these once crashed the smoke test's reference with a traceback (KeyError, ValueError in rms_norm, IndexError)
@pytest.mark.parametrize("edit", [
    lambda text: text.update(rms_norm_eps="x"),
    lambda text: text["rope_parameters"].update(mrope_section=[1]),
    lambda text: text["rope_parameters"].update(mrope_section=[8, "4", 4]),
    lambda text: text["rope_parameters"].update(partial_rotary_factor=2),
], ids=["eps-string", "mrope-section-short", "mrope-section-string", "rotary-factor-above-one"])
def test_a_config_the_reference_cannot_read_is_refused_in_one_line_before_writing(edit, tmp_path: Path) -> None:
    source = with_text_config(tmp_path, edit)
    one_line_error(run_vlhub("convert", str(source), "--to", "safetensors", "--out", str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


# transformers defaults a missing rms_norm_eps to 1e-6 (configuration_qwen3_5.py:90, and Qwen3-VL's text config);
# Qwen3-VL's reference once read it from config.json alone and crashed (KeyError) after writing
@pytest.mark.parametrize("model", ["tiny-qwen3.5", "tiny-qwen3-vl", "tiny-qwen3-vl-moe"])
def test_a_missing_epsilon_takes_transformers_default(model: str, tmp_path: Path) -> None:
    source = with_text_config(tmp_path, lambda text: text.pop("rms_norm_eps"), model)
    result = run_vlhub("convert", str(source), "--to", "safetensors", "--out", str(tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["smoke"]["passed"]


def test_an_epsilon_that_is_not_a_number_is_refused_before_writing_in_qwen3_vl_too(tmp_path: Path) -> None:
    source = with_text_config(tmp_path, lambda text: text.update(rms_norm_eps="x"), "tiny-qwen3-vl")
    line = one_line_error(run_vlhub("convert", str(source), "--to", "safetensors", "--out", str(tmp_path / "out")))
    assert "rms_norm_eps" in line
    assert not (tmp_path / "out").exists()


# --to tpu-mlir once dropped mtp.* without a word (the issue: "dropped with a note"); every target names them
@pytest.mark.parametrize("target", ["tpu-mlir", "safetensors", "paddle"])
def test_tpu_mlir_says_it_dropped_the_multi_token_prediction_head(target: str, tmp_path: Path) -> None:
    # beside the 6 the built-in model carries
    source = with_extra_tensors(tmp_path, {"mtp.layers.0.self_attn.q_proj.weight": (64, 64),
                                           "mtp.layers.0.mlp.gate_proj.weight": (128, 64),
                                           "mtp.layers.0.mlp.up_proj.weight": (128, 64)})
    out = tmp_path / "out"
    result = run_vlhub("convert", str(source), "--to", target, "--out", str(out), "--no-smoke")
    assert result.returncode == 0, result.stderr
    assert "note: dropped 9 mtp.* tensors (the multi-token-prediction head" in result.stderr
    manifest = (out / "vlhub-manifest.json").read_text()
    assert '"drop": 9' in manifest or "dropped 9 mtp.* tensors" in manifest


# llm_convert's Qwen3_5Converter rotates sum(mrope_section) * 2 dims (apply_rotary_pos: mrope_dim), transformers
# head_dim * partial_rotary_factor; --to tpu-mlir once wrote a model/ where they differ
def test_tpu_mlir_refuses_sections_that_do_not_cover_the_rotated_dims(tmp_path: Path) -> None:
    # 16 of 32 dims; sections cover 8
    source = with_text_config(tmp_path, lambda text: text["rope_parameters"].update(partial_rotary_factor=0.5))
    line = one_line_error(run_vlhub("convert", str(source), "--to", "tpu-mlir", "--out", str(tmp_path / "out"),
                                    "--no-smoke"))
    assert "mrope_section" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model", ["tiny-qwen3.5", "tiny-qwen3.5-moe"])
@pytest.mark.parametrize("target", ["paddle", "tpu-mlir"])
def test_the_built_in_models_carry_the_multi_token_prediction_head_and_every_target_drops_it(
        model: str, target: str, tmp_path: Path) -> None:
    with ModelWeights.open(resolve_source(model)) as weights:
        assert any(name.startswith("mtp.") for name in weights.checkpoint.tensors)  # as the releases have
    result = run_vlhub("convert", model, "--to", target, "--out", str(tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr
    assert "note: dropped 6 mtp.* tensors (the multi-token-prediction head: no target uses it)" in result.stderr
    said = json.loads(result.stdout)
    assert said["smoke"]["passed"]
    assert (said["target"]["dropped"] if target == "tpu-mlir" else said["ops"]["drop"]) in (
        ["dropped 6 mtp.* tensors (the multi-token-prediction head: no target uses it)"], 6)


@pytest.mark.parametrize("interval", [None, 2, 1])
def test_a_config_without_layer_types_has_the_layers_transformers_builds(interval: int | None,
                                                                          tmp_path: Path) -> None:
    source = shutil.copytree(resolve_source("tiny-qwen3.5"), tmp_path / "source")
    config = json.loads((source / "config.json").read_text())
    text = config["text_config"]
    text.pop("layer_types")
    if interval is not None:
        text["full_attention_interval"] = interval
    (source / "config.json").write_text(json.dumps(config))
    built = transformers.Qwen3_5TextConfig(num_hidden_layers=text["num_hidden_layers"],
                                           **({} if interval is None else {"full_attention_interval": interval}))
    full = load_keymap("qwen3_5").resolve_dims(config)["full_layers"]
    assert full == tuple(i for i, kind in enumerate(built.layer_types) if kind == "full_attention")
    if interval is None:  # the tensors are the default layers': the conversion and its smoke pass
        result = run_vlhub("convert", str(source), "--to", "paddle", "--out", str(tmp_path / "out"), "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["smoke"]["passed"]


def test_sections_that_do_not_cover_the_rotated_dims_run_in_paddle(tmp_path: Path) -> None:
    """transformers rotates the slots the M-RoPE sections name and leaves the rest to the time position; the Paddle
    network once refused such a config after the conversion was written (only llm_convert needs them to cover)."""
    source = with_text_config(tmp_path, lambda text: text["rope_parameters"].update(partial_rotary_factor=0.5))
    sections = json.loads((source / "config.json").read_text())["text_config"]["rope_parameters"]["mrope_section"]
    head_dim = json.loads((source / "config.json").read_text())["text_config"]["head_dim"]
    assert 2 * sum(sections) < head_dim * 0.5  # the case: fewer slots named than rotated
    result = run_vlhub("convert", str(source), "--to", "paddle", "--out", str(tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["smoke"]["passed"]
