"""vlhub's `--to paddle` output of Qwen-VL (v1) against the parameters of PaddleMIX's `QWenLMHeadModel`.

PaddleMIX itself is not installed (it builds the LLM through PaddleNLP); the parameter list below is its model's,
at PaddleMIX HEAD (paddlemix/models/qwen_vl/modeling.py, visual.py, qwen_vit.py), computed from config.json: the
LLM under `transformer.llm.` (a PaddleNLP QWenModel), the ViT under `visual.vit.`, the resampler, `ln_post` and
`proj` under `visual.`, and `lm_head`. Paddle's nn.Linear stores its weight [in, out].
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import run_vlhub

paddle = pytest.importorskip("paddle")

# Qwen-VL's ViT position table and its resampler's queries: a 16 x 16 grid, whatever the config
QUERIES = 256

Shapes = dict[str, tuple[int, ...]]


def _linear(name: str, fan_in: int, fan_out: int, *, bias: bool = True) -> Shapes:
    return {f"{name}.weight": (fan_in, fan_out)} | ({f"{name}.bias": (fan_out,)} if bias else {})


def _layer_norm(name: str, width: int) -> Shapes:
    return {f"{name}.weight": (width,), f"{name}.bias": (width,)}


def paddlemix_parameters(config: dict) -> Shapes:
    """QWenLMHeadModel's parameter names and shapes for this config.json."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    ffn = config["intermediate_size"] // 2  # w1 and w2 each hold half, as in the Hugging Face model
    visual = config["visual"]
    width, out, patch = visual["width"], visual["output_dim"], visual["patch_size"]
    shapes: Shapes = {"transformer.llm.wte.weight": (vocab, hidden), "transformer.llm.ln_f.weight": (hidden,)}
    for n in range(config["num_hidden_layers"]):
        layer = f"transformer.llm.h.{n}"
        shapes |= {f"{layer}.ln_1.weight": (hidden,), f"{layer}.ln_2.weight": (hidden,),  # RMSNorm: no bias
                   **_linear(f"{layer}.attn.c_attn", hidden, 3 * hidden),
                   **_linear(f"{layer}.attn.c_proj", hidden, hidden, bias=False),
                   **_linear(f"{layer}.mlp.w1", hidden, ffn, bias=False),
                   **_linear(f"{layer}.mlp.w2", hidden, ffn, bias=False),
                   **_linear(f"{layer}.mlp.c_proj", ffn, hidden, bias=False)}
    shapes |= {"visual.vit.conv1.weight": (width, 3, patch, patch),  # Conv2D, no bias
               "visual.vit.positional_embedding": (QUERIES, width), **_layer_norm("visual.vit.ln_pre", width)}
    mlp = int(width * visual["mlp_ratio"])
    for n in range(visual["layers"]):
        block = f"visual.vit.transformer.resblocks.{n}"
        shapes |= {**_layer_norm(f"{block}.ln_1", width), **_layer_norm(f"{block}.ln_2", width),
                   **_linear(f"{block}.attn.in_proj", width, 3 * width),
                   **_linear(f"{block}.attn.out_proj", width, width),
                   **_linear(f"{block}.mlp.c_fc", width, mlp), **_linear(f"{block}.mlp.c_proj", mlp, width)}
    pool = "visual.attn_pool"
    shapes |= {f"{pool}.pos_embed": (QUERIES, out), f"{pool}.query": (QUERIES, out),
               # PaddleMIX's own MultiHeadAttention: one [E, 3E] input projection, sliced by columns
               f"{pool}.attn.in_proj_weight": (out, 3 * out), f"{pool}.attn.in_proj_bias": (3 * out,),
               **_linear(f"{pool}.attn.out_proj", out, out),
               **_layer_norm(f"{pool}.ln_q", out), **_layer_norm(f"{pool}.ln_kv", out),
               **_layer_norm("visual.ln_post", out), "visual.proj": (out, out),  # used as x @ proj
               **_linear("lm_head", hidden, vocab, bias=False)}
    if width != out:  # the resampler projects the ViT's width to its own, an identity when they are equal
        shapes |= _linear(f"{pool}.kv_proj", width, out, bias=False)
    return shapes


@pytest.fixture(scope="module")
def converted(vlhub_home: Path, module_tmp: Callable[[str], Path]) -> Path:
    """`vlhub convert tiny-qwen-vl --to paddle` (no smoke test: this module checks the output itself)."""
    out = module_tmp("paddlemix-qwen-vl") / "paddle"
    result = run_vlhub("convert", "tiny-qwen-vl", "--to", "paddle", "--out", str(out), "--no-smoke")
    assert result.returncode == 0, result.stderr
    return out


def test_parameters_are_paddlemix_qwen_lm_head_models(converted: Path) -> None:
    config = json.loads((converted / "config.json").read_text())
    weights = paddle.load(str(converted / "model_state.pdparams"), return_numpy=True)
    assert {name: tuple(array.shape) for name, array in weights.items()} == paddlemix_parameters(config)


def test_config_names_the_llm_config_paddlemix_builds_from(converted: Path) -> None:
    config = json.loads((converted / "config.json").read_text())
    llm = json.loads((Path(config["llm_pretrained_model_name_or_path"]) / "config.json").read_text())
    dims = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
    assert llm["model_type"] == "qwen"
    assert {key: llm[key] for key in dims} == {key: config[key] for key in dims}
