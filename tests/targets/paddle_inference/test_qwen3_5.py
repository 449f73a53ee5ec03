"""`--to paddle-inference` and `--to vamc` refuse Qwen3.5 in one line, naming the vendor's route: vlhub has no static
graph of its linear-attention layers (PaddleFormers loads `--to paddle`'s directory, FastDeploy serves the text part),
and VastAI has no recipe for it at all; nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import one_line_error, run_vlhub


@pytest.mark.parametrize("name", ["tiny-qwen3.5", "tiny-qwen3.5-moe"])
@pytest.mark.parametrize(("target", "route"), [
    ("paddle-inference", "convert with --to paddle and serve that directory with PaddleFormers"),
    ("vamc", "VastAI has no route for Qwen3.5"),
])
def test_targets_without_a_route_refuse_in_one_line(name: str, target: str, route: str, tmp_path: Path) -> None:
    line = one_line_error(run_vlhub("convert", name, "--to", target, "--out", str(tmp_path / "out")))
    assert route in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("target", "route"), [("paddle-inference", "PaddleFormers"), ("vamc", "VastModelZOO")])
def test_plan_for_a_target_without_a_route_refuses_in_one_line(target: str, route: str) -> None:
    assert route in one_line_error(run_vlhub("plan", "tiny-qwen3.5", "--image", "640x480", "--target", target))
