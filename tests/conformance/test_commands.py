"""Every vlhub command on checkpoints that transformers saved from drawn configs (see `factory`).

Each command either succeeds with a result that code vlhub did not write confirms (transformers loads what
`convert`, `keys` and the TPU-MLIR and vamc weight folders hold, with every tensor equal to the model's; its
image processor gives the token counts `plan` prints; the embedding dump equals the model's table), with
its default smoke test passed, or refuses with one line and exit 2 for a reason listed in `REFUSALS`.
Never a traceback, never exit 1 for a valid checkpoint.

VLHUB_CONFORMANCE_EXAMPLES sets how many checkpoints each family draws (default 4; the draws are seeded,
so a run is repeatable).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from typer.testing import CliRunner

from tests.conformance.factory import FAMILIES, PATCH, CheckpointSpec, checkpoint_specs, save_checkpoint
from tests.conformance.judge import CONVERT_TARGETS, assert_same_weights, judge_conversion, transformers_state
from vlhub.cli.app import app

EXAMPLES = int(os.environ.get("VLHUB_CONFORMANCE_EXAMPLES", "4"))
# the refusals a valid checkpoint may meet, by command: each names what vlhub cannot handle
REFUSALS = {
    "tpu-mlir": [
        r"vision heads are \d+ wide; TPU-MLIR's llm_convert compiles only 80",
        # llm_convert's default quantization groups must divide each Linear's input width
        r"--group-size \d+: it must divide every quantized Linear's input",
        r"--to tpu-mlir takes dense Qwen3-VL only",  # llm_convert has no qwen3_vl_moe
        # Qwen3_5Converter's chunked linear attention needs key and value heads of one width
        r"linear_key_head_dim \d+ and linear_value_head_dim \d+: TPU-MLIR's llm_convert compiles only",
        # LLM-TPU's Qwen3.5 runtime runs every fourth layer as full attention (drawn layer_types may differ)
        r"layer_types puts full attention at layers .*; LLM-TPU's runtime",
    ],
    # no vamc route for Qwen3-VL (VastAI serves it through vllm_vacc); no static graph of a Qwen3-VL MoE's routing
    "vamc": [r"VastAI serves Qwen3-VL through vllm_vacc", r"VastAI has no route for Qwen3.5"],
    "paddle-inference": [r"--to paddle-inference takes dense Qwen3-VL only",
                         r"--to paddle-inference has no static graph of Qwen3.5's linear-attention layers"],
    "keys": [r"rewrites safetensors and pdparams checkpoints, not torch",
             r"would leave the keys in no qwen3_(vl|5) layout"],
}


@dataclass
class Outcome:
    """What one command did: exit 0, or a refusal (exit 2, one line)."""

    command: list[str]
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def vlhub(*args: str, failed_checks: bool = False) -> Outcome:
    """Run a vlhub command in this process; fail the test on a traceback, an exit 1 (unless `failed_checks`: a
    checklist may fail) or a refusal not in REFUSALS."""
    result = CliRunner().invoke(app, list(args), catch_exceptions=True)
    outcome = Outcome(list(args), result.exit_code, result.stdout, result.stderr)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"vlhub {' '.join(args)} raised {result.exception!r}") from result.exception
    allowed = (0, 1, 2) if failed_checks else (0, 2)
    assert outcome.exit_code in allowed, f"vlhub {' '.join(args)} exited {outcome.exit_code}: {outcome.stderr}"
    if outcome.exit_code == 2:
        lines = outcome.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), f"vlhub {' '.join(args)}: {outcome.stderr}"
        command = args[3] if args[0] == "convert" else args[0]  # convert SRC --to TARGET: by target
        allowed = REFUSALS.get(command, [])
        assert any(re.search(pattern, lines[0]) for pattern in allowed), f"vlhub {' '.join(args)} refused: {lines[0]}"
    return outcome


def run_every_command(spec: CheckpointSpec, work: Path) -> list[Outcome]:
    """Save `spec` with transformers and run every command on it, judging each result; returns the outcomes."""
    source = work / "source"
    model = save_checkpoint(spec, source)
    expected = dict(model.state_dict())
    outcomes = []

    outcomes.append(check_inspect(spec, source, expected))
    outcomes.append(check_plan(spec, source))
    outcomes.append(check_embeddings(spec, source, work / "embed.bin", expected))
    outcomes.append(check_keys(spec, source, work / "renamed", expected))

    for target in CONVERT_TARGETS:
        out = work / target
        converted = vlhub("convert", str(source), "--to", target, "--out", str(out))
        outcomes.append(converted)
        if not converted.ok:
            continue
        judge_conversion(spec, target, out, expected)
        outcomes.append(check_layout(out))
    outcomes.append(vlhub("smoke", str(work / "paddle")))
    return outcomes


def check_inspect(spec: CheckpointSpec, source: Path, expected: dict) -> Outcome:
    """`inspect` names the family, counts the model's parameters and says whether it ties its embeddings."""
    outcome = vlhub("inspect", str(source), "--json")
    report = json.loads(outcome.stdout)
    # a tied model's lm_head is the embedding: transformers lists it in the state dict, the file does not hold it
    params = sum(t.numel() for name, t in expected.items() if not (spec.text.tied and name == "lm_head.weight"))
    assert (report["family"], report["tie_word_embeddings"], report["num_params"]) == (
        spec.family, spec.text.tied, params), report
    return outcome


def check_layout(out: Path) -> Outcome:
    """`check` passes everything but the vendor toolchains, which this machine does not have."""
    outcome = vlhub("check", str(out), "--json", failed_checks=True)
    failed = [c for c in json.loads(outcome.stdout)["checks"] if c["status"] == "fail" and c["group"] != "toolchain"]
    assert not failed, failed
    return outcome


def check_plan(spec: CheckpointSpec, source: Path) -> Outcome:
    """`plan`'s token count for an image equals what transformers' image processor makes of it."""
    from transformers import Qwen2VLImageProcessor

    width, height = 1280, 720
    outcome = vlhub("plan", str(source), "--image", f"{width}x{height}", "--json")
    if not outcome.ok:
        return outcome
    plan = json.loads(outcome.stdout)
    # transformers' processor with the family's patch size and the pixel bounds of its published
    # preprocessor_config.json (the drawn checkpoint has none of its own)
    bounds = {"shortest_edge": plan["min_pixels"], "longest_edge": plan["max_pixels"]}
    processor = Qwen2VLImageProcessor(patch_size=PATCH[spec.family], merge_size=2, temporal_patch_size=2, size=bounds)
    image = np.zeros((height, width, 3), dtype=np.uint8)
    grid = processor(images=[image], return_tensors="np")["image_grid_thw"][0]
    tokens = int(np.prod(grid)) // 4
    assert plan["inputs"][0]["tokens"] == tokens, (plan["inputs"][0], grid)
    return outcome


def check_embeddings(spec: CheckpointSpec, source: Path, out: Path, expected: dict) -> Outcome:
    """The dumped table equals the model's embedding, cast to the dump's dtype."""
    outcome = vlhub("dump-embeddings", str(source), "--out", str(out), "--json")
    if not outcome.ok:
        return outcome
    (info,) = json.loads(outcome.stdout)
    table = np.fromfile(out, dtype=np.dtype(info["dtype"]).newbyteorder("<")).reshape(info["shape"])
    import torch

    embedding = expected["model.language_model.embed_tokens.weight"].to(getattr(torch, info["dtype"]))
    np.testing.assert_array_equal(table.astype(np.float32), embedding.float().numpy())
    return outcome


def check_keys(spec: CheckpointSpec, source: Path, out: Path, expected: dict) -> Outcome:
    """Renaming the official names to transformers' in-memory ones (or back) gives a checkpoint transformers
    loads with every tensor equal (Qwen3-VL's in-memory names are the official ones: renaming one of its
    prefixes leaves the keys in no layout of it, which keys refuses)."""
    if spec.family in ("qwen3_vl", "qwen3_5"):
        return vlhub("keys", str(source), "--rename", "model.language_model.=model.", "--out", str(out))
    if spec.disk_form == "memory-names":
        renames = ["model.visual.=visual.", "model.language_model.=model."]
    else:
        renames = ["visual.=model.visual.", "model.=model.language_model."]
    outcome = vlhub("keys", str(source), *[arg for rename in renames for arg in ("--rename", rename)],
                    "--out", str(out))
    if outcome.ok:
        assert_same_weights(transformers_state(out, spec), expected, "keys --rename")
    return outcome


def _drawn(family: str) -> settings:
    return settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                    phases=[Phase.explicit, Phase.generate],  # no shrinking: each example takes seconds
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("family", FAMILIES)
def test_every_command_on_drawn_checkpoints(family: str) -> None:
    @_drawn(family)
    @given(spec=checkpoint_specs(family))
    def every_command(spec: CheckpointSpec) -> None:
        note(spec.describe())
        with tempfile.TemporaryDirectory(prefix="vlhub-conformance-") as work:
            run_every_command(spec, Path(work))

    every_command()
