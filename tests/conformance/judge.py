"""How the conformance tests judge vlhub's output: with code vlhub did not write (transformers' own loader)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conformance.factory import CheckpointSpec, model_class

CONVERT_TARGETS = ("paddle", "safetensors", "torch", "paddle-inference", "tpu-mlir", "vamc")
# targets whose weights are a Hugging Face folder (the layouts name it in their manifest's target.weights)
HF_FOLDERS = ("safetensors", "torch", "tpu-mlir", "vamc")


def transformers_state(directory: Path, spec: CheckpointSpec) -> dict:
    """The state dict transformers loads from `directory`, in the dtype stored there (judged by its own loader)."""
    return dict(model_class(spec).from_pretrained(directory, dtype="auto").state_dict())


def assert_same_weights(loaded: dict, expected: dict, what: str) -> None:
    """Every tensor equal to the source model's, cast as the loaded one is (a float16 layout holds float16)."""
    assert loaded.keys() == expected.keys(), f"{what}: {sorted(loaded.keys() ^ expected.keys())[:5]}"
    for name, tensor in expected.items():
        cast = tensor.to(loaded[name].dtype)
        assert loaded[name].equal(cast), f"{what}: {name} differs"


def judge_conversion(spec: CheckpointSpec, target: str, out: Path, expected: dict) -> None:
    """The conversion's recorded smoke verdict passed, and where it wrote a Hugging Face folder transformers
    itself loads it with every tensor equal to the source model's."""
    manifest = json.loads((out / "vlhub-manifest.json").read_text())
    assert manifest["smoke"]["state"] == "passed", manifest["smoke"]
    # a Paddle target that writes the Hugging Face form (PaddleFormers' Qwen3-VL) is judged the same way
    if target in HF_FOLDERS or manifest["target"].get("layout") == "paddleformers":
        weights = out / manifest["target"]["weights"] if "weights" in manifest["target"] else out
        assert_same_weights(transformers_state(weights, spec), expected, f"--to {target}")
