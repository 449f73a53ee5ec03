"""An independent consumer of `vlhub convert --to paddle`: PaddleX's own Qwen2-VL / Qwen2.5-VL models.

Checkpoints drawn by `tests/conformance/factory.py` and saved by transformers are converted with the `vlhub convert`
command, then loaded by PaddleX's Qwen2-VL / Qwen2.5-VL classes, the ones its PP-DocBee models derive from
(`paddlex/inference/models/doc_vlm/modeling/qwen2_vl.py`, `qwen2_5_vl.py`), through PaddleX's own `from_pretrained`.
Its loader must find every key, and its logits, text-only and with an image, must match transformers' on the source
checkpoint within 1e-4 relative. Both sides run in float32 on the same values: the drawn bfloat16 / float16 weights
upcast exactly.

Needs the `interop` extra (PaddleX); the module is skipped without it.
"""

from __future__ import annotations

import tempfile
from dataclasses import astuple, dataclass, field, replace
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

pytest.importorskip("paddlex", reason="PaddleX is the `interop` extra: pip install -e '.[interop]'")
paddle = pytest.importorskip("paddle")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from paddlex.inference.models.doc_vlm.modeling.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from paddlex.inference.models.doc_vlm.modeling.qwen2_vl import Qwen2VLForConditionalGeneration
from transformers import AutoModelForImageTextToText, Qwen2VLImageProcessorPil
from typer.testing import CliRunner

from tests.conformance.factory import (
    CheckpointSpec,
    SpecialTokens,
    TextDims,
    VisionDims,
    checkpoint_specs,
    save_checkpoint,
)
from vlhub.cli.app import app

# PaddleX's text rotary embedding enters paddle.amp.auto_cast, which warns on every call off GPU
pytestmark = pytest.mark.filterwarnings("ignore:amp_guard can only be enabled:UserWarning")

TOLERANCE = 1e-4  # relative_diff of PaddleX's logits from transformers'
# each example converts and loads a model (seconds): a few seeded draws per family, no shrinking
EXAMPLES = 5
# PaddleX's Qwen2.5-VL defaults to flash attention (GPU only) and its "sdpa" vision attention computes in bf16/fp16;
# "eager" is the float32 path, the one its own PP-DocBee2 pipeline builds. Its Qwen2-VL falls back to eager by
# itself when flash-attn is absent.
# the families PaddleX has a model of (no Qwen3-VL: its doc_vlm models are Qwen2-VL and Qwen2.5-VL)
PADDLEX_MODELS: dict[str, tuple[type, dict[str, str]]] = {
    "qwen2_vl": (Qwen2VLForConditionalGeneration, {}),
    "qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration, {"attn_implementation": "eager"}),
}


@dataclass
class LoadReport:
    """The key verdict of PaddleX's loader (`_load_pretrained_model`), which `from_pretrained` only logs."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple] = field(default_factory=list)


def reference_model(source: Path) -> object:
    """transformers' model of the saved checkpoint in float32: the drawn bf16 / fp16 weights upcast exactly, and the
    rotary frequencies computed in float32 as PaddleX computes them (a model cast to bf16 rounds them)."""
    return AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32).eval()


def convert(spec: CheckpointSpec, source: Path, out: Path) -> None:
    """`vlhub convert SOURCE --to paddle`, sharded at the drawn size so PaddleX reads vlhub's pdparams index too.
    No smoke test: it runs vlhub's own Paddle forward, and this test is the judge that vlhub did not write."""
    result = CliRunner().invoke(app, ["convert", str(source), "--to", "paddle", "--out", str(out),
                                      "--max-shard-size", str(spec.max_shard_size), "--no-smoke"])
    assert result.exit_code == 0, result.output


def load_paddlex(family: str, directory: Path) -> tuple[object, LoadReport]:
    """PaddleX's model built and filled by its own `from_pretrained`, in float32, with its loader's verdict."""
    model_class, options = PADDLEX_MODELS[family]
    report = LoadReport()
    load = model_class._load_pretrained_model

    def recording(*args: object, **kwargs: object) -> tuple:
        loaded = load(*args, **kwargs)
        _, report.missing, report.unexpected, report.mismatched = loaded
        return loaded

    with mock.patch.object(model_class, "_load_pretrained_model", recording):
        model = model_class.from_pretrained(str(directory), dtype="float32", **options)
    model.eval()
    return model, report


def assert_every_key_loaded(spec: CheckpointSpec, model: object, report: LoadReport) -> None:
    """No checkpoint key unused, none mis-shaped, every parameter of PaddleX's model filled."""
    assert (report.unexpected, report.mismatched) == ([], [])
    if spec.text.tied:
        # PaddleX's tied lm_head *is* the embedding parameter, yet its state dict names it twice; a tied checkpoint
        # holds the one tensor (transformers saves it so, Qwen2.5-VL-3B is published so, PaddleMIX's converter keeps it)
        assert report.missing == ["lm_head.weight"]
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        assert report.missing == []


def relative_diff(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected|"""
    assert actual.shape == expected.shape
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def both_logits(source: object, paddlex_model: object, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(PaddleX's, transformers') logits on the same inputs."""
    with torch.no_grad():
        expected = source(**{name: torch.from_numpy(value) for name, value in inputs.items()}).logits[0].numpy()
    with paddle.no_grad():
        actual = paddlex_model(**{name: paddle.to_tensor(value) for name, value in inputs.items()}).logits[0].numpy()
    return actual, expected


@st.composite
def prompt_halves(draw: st.DrawFn, spec: CheckpointSpec) -> tuple[list[int], list[int]]:
    """Ordinary token ids (none of the drawn special ones) to put before and after an image."""
    special = set(astuple(spec.tokens))
    word = st.integers(0, spec.text.vocab - 1).filter(lambda token: token not in special)
    return draw(st.lists(word, min_size=1, max_size=8)), draw(st.lists(word, min_size=1, max_size=8))


# image sides in multiples of 28 px (one merged token), so the processor keeps the size: 2x2 to 6x8 merged
# tokens, across the drawn Qwen2.5-VL windows (2, 4 or 8 merged tokens wide), partial ones included
image_sizes = st.tuples(st.integers(2, 6), st.integers(2, 8)).map(lambda merged: (28 * merged[0], 28 * merged[1]))


def text_inputs(ids: list[int]) -> dict[str, np.ndarray]:
    # M-RoPE's three position rows are equal for text
    return {"input_ids": np.array([ids]), "position_ids": np.tile(np.arange(len(ids)), (3, 1, 1))}


def image_inputs(spec: CheckpointSpec, source: object, before: list[int], after: list[int],
                 size: tuple[int, int]) -> dict[str, np.ndarray]:
    """A random picture through transformers' own image processor, its tokens between `before` and `after`, and
    the M-RoPE positions transformers computes for them (given to both models)."""
    picture = np.random.default_rng(spec.seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    pixels = Qwen2VLImageProcessorPil()(images=picture, return_tensors="pt")
    grid = pixels["image_grid_thw"]
    tokens = spec.tokens
    image = [tokens.image] * (int(grid.prod()) // 4)
    ids = torch.tensor([before + [tokens.vision_start] + image + [tokens.vision_end] + after])
    positions, _ = source.model.get_rope_index(ids, (ids == tokens.image).int(), image_grid_thw=grid)
    return {"input_ids": ids.numpy(), "position_ids": positions.numpy(),
            "pixel_values": pixels["pixel_values"].numpy(), "image_grid_thw": grid.numpy()}


def paddlex_agreement(spec: CheckpointSpec, before: list[int], after: list[int],
                      size: tuple[int, int]) -> tuple[float, float]:
    """Save `spec` with transformers, convert it, load it into PaddleX (asserting every key loaded) and return the
    relative logit differences: text-only (`before + after`), and with a `size` picture between them."""
    with tempfile.TemporaryDirectory(prefix="vlhub-interop-") as work:
        save_checkpoint(spec, Path(work, "source"))
        source = reference_model(Path(work, "source"))
        convert(spec, Path(work, "source"), Path(work, "paddle"))
        paddlex_model, report = load_paddlex(spec.family, Path(work, "paddle"))
    assert_every_key_loaded(spec, paddlex_model, report)
    text = relative_diff(*both_logits(source, paddlex_model, text_inputs(before + after)))
    image = relative_diff(*both_logits(source, paddlex_model, image_inputs(spec, source, before, after, size)))
    return text, image


@pytest.mark.parametrize("family", PADDLEX_MODELS)
@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
          phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), size=image_sizes)
def test_paddlex_loads_vlhub_paddle_output(family: str, data: st.DataObject, size: tuple[int, int]) -> None:
    spec = data.draw(checkpoint_specs(family), label="checkpoint")
    note(spec.describe())
    before, after = data.draw(prompt_halves(spec), label="prompt")
    text, image = paddlex_agreement(spec, before, after, size)
    note(f"relative difference: text-only {text:.2e}, with a {size[1]}x{size[0]} image {image:.2e}")
    assert text <= TOLERANCE
    assert image <= TOLERANCE


# intermediate_size == hidden_size: a valid checkpoint (transformers saves and runs it) whose MLP weights are square
SQUARE_MLP = CheckpointSpec(
    family="qwen2_vl",
    text=TextDims(vocab=1000, heads=2, kv_heads=1, head_dim=12, intermediate=24, layers=1, tied=False,
                  mrope_section=(1, 1, 4), rope_theta=1e6),
    vision=VisionDims(depth=1, heads=1, head_dim=32, mlp=64, mlp_ratio=2, window_size=112, fullatt_blocks=()),
    tokens=SpecialTokens(image=10, video=11, vision_start=12, vision_end=13, bos=14, eos=15),
    dtype="float32", disk_form="official", max_shard_size=50_000_000, seed=0,
)


@pytest.mark.parametrize("family", PADDLEX_MODELS)
def test_paddlex_loads_square_mlp_checkpoint(family: str) -> None:
    text, image = paddlex_agreement(replace(SQUARE_MLP, family=family), [1, 2], [3], (56, 84))
    assert text <= TOLERANCE
    assert image <= TOLERANCE
