"""`vlhub plan` as a command: its table and JSON, its one-line refusals, and the `vlhub convert` commands it prints,
each accepted by convert and run on the tiny models (the arithmetic: tests/unit/test_plan.py)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.helpers import plan_max_seq_len as max_seq_len
from tests.helpers import plan_tpu as tpu
from tests.helpers import plan_vamc as vamc
from tests.helpers import hard_link_or_copy, run_vlhub, run_vlhub_subprocess
from vlhub.cli import convert as convert_command
from vlhub.cli.app import app
from vlhub.plan import make_plan


def test_a_target_the_model_cannot_take_is_noted_unless_named(tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    """A Qwen2-VL whose vision heads are 40 wide has no TPU-MLIR route: plan says so and plans the others."""
    for entry in tiny_qwen2_vl.iterdir():
        hard_link_or_copy(entry, tmp_path / entry.name)
    config = json.loads((tiny_qwen2_vl / "config.json").read_text())
    config["vision_config"]["num_heads"] = 4
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps(config))
    plan = make_plan(str(tmp_path), images=[(1280, 720)])
    assert tpu(plan) is None and "vision heads are 40 wide" in plan.unavailable["tpu-mlir"]
    assert vamc(plan) is not None and max_seq_len(plan) is not None
    assert plan.to_json()["targets"]["tpu-mlir"] == {"unavailable": plan.unavailable["tpu-mlir"]}
    result = run_vlhub("plan", str(tmp_path), "--image", "1280x720", "--target", "tpu-mlir")
    assert result.returncode == 2 and "vision heads are 40 wide" in result.stderr


def test_720p_on_qwen2_vl_7b() -> None:
    result = run_vlhub("plan", "qwen2-vl-7b", "--image", "1280x720")
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.strip().startswith("image 1280x720"))
    assert " input WxH       resized WxH  grid t x h x w" in result.stdout  # sizes width first, input and resized
    assert row.split() == ["image", "1280x720", "1288x728", "1x52x92", "4784", "1196", "yes"]
    assert "visual N           4784" in result.stdout and "vamc output split  5 x 640 + 384" in result.stdout
    data = json.loads(run_vlhub("plan", "qwen2-vl-7b", "--image", "1280x720", "--json").stdout)
    assert data["compile"]["visual_patches"] == 4784 and 4784 % 16 == 0
    assert data["compile"]["prefill_length"] == 1328 and data["compile"]["max_length"] == 1840  # 1196+128; +512


def test_720p_against_a_4096_build() -> None:
    result = run_vlhub("plan", "qwen2-vl-7b", "--image", "1280x720", "--max-pixels", "921600", "--patches", "4096")
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.strip().startswith("image 1280x720"))
    assert row.split()[:6] == ["image", "1280x720", "1260x700", "1x50x90", "4500", "1125"]
    assert "no: at max_pixels 802816 it becomes 1176x672, 4032 patches" in row
    assert "fits N=4096" in result.stdout
    assert "vamc N             4096" in result.stdout and "vamc max_pixels    802816" in result.stdout


def test_json_keys() -> None:
    result = run_vlhub("plan", "qwen2-vl-7b", "--image", "1280x720", "--max-pixels", "921600", "--patches", "4096",
                       "--json")
    data = json.loads(result.stdout)
    assert set(data) == {"model", "family", "min_pixels", "max_pixels", "prompt_tokens", "answer_tokens",
                         "fit_patches", "inputs", "compile", "targets"}
    (item,) = data["inputs"]
    keys = {"input", "kind", "width", "height", "frames", "resized", "grid", "patches", "tokens"}
    assert set(item) == keys | {"fits", "refit"} and set(item["refit"]) == keys | {"max_pixels"}
    assert item["resized"] == {"height": 700, "width": 1260} and item["fits"] is False
    assert item["refit"]["resized"] == {"height": 672, "width": 1176} and item["refit"]["patches"] == 4032
    assert set(data["compile"]) == {"visual_patches", "prefill_length", "max_length", "position_limit"}
    assert set(data["targets"]) == {"vamc", "tpu-mlir", "paddle-inference"}
    assert set(data["targets"]["vamc"]) == {"visual_patches", "given", "max_pixels", "input_ids", "output_split",
                                            "command"}
    # vamc's prefill holds N's tokens, whatever the input: 4096 / 4 = 1024 + 128 = 1152; + 512 = 1664
    assert data["targets"]["vamc"]["command"] == ("vlhub convert qwen2-vl-7b --to vamc --max-pixels 802816 "
                                                  "--prefill-len 1152 --max-len 1664")
    assert data["targets"]["vamc"]["max_pixels"] == 802816
    assert set(data["targets"]["tpu-mlir"]) == {"max_pixels", "seq_length", "vision_patches", "vision_tokens",
                                                "command"}
    assert data["targets"]["paddle-inference"] == {
        "max_seq_len": 1776, "command": "vlhub convert qwen2-vl-7b --to paddle-inference --max-seq-len 1776"}


def test_qwen_vl_plans_for_paddle_inference_only() -> None:
    result = CliRunner().invoke(app, ["plan", "qwen-vl-chat-7b", "--image", "1280x720", "--json"])
    data = json.loads(result.stdout)
    assert set(data["targets"]) == {"paddle-inference"} and data["inputs"][0]["tokens"] == 256
    assert data["targets"]["paddle-inference"]["max_seq_len"] == 896


@pytest.mark.parametrize(("args", "says"), [
    (["qwen-vl-7b", "--image", "448x448", "--target", "vamc"], "no vamc route"),
    (["qwen-vl-7b", "--image", "448x448", "--target", "tpu-mlir"], "no TPU-MLIR route"),
    (["qwen-vl-7b", "--image", "448x448", "--patches", "1024"], "no vamc route"),
    (["qwen-vl-7b", "--image", "448x448", "--max-pixels", "802816"], "448x448"),
    (["qwen-vl-7b", "--video", "448x448", "--frames", "4"], "images only"),
    (["qwen2-vl-7b", "--image", "1280"], "WIDTHxHEIGHT"),
    (["qwen2-vl-7b", "--image", "1280x720x3"], "WIDTHxHEIGHT"),
    (["qwen2-vl-7b", "--image", "wide"], "e.g. 1280x720"),
    (["qwen2-vl-7b", "--image", "0x720"], "from 1 to 65535 pixels"),
    (["qwen2-vl-7b", "--image", "-1280x720"], "from 1 to 65535 pixels"),
    (["qwen2-vl-7b", "--video", "1280x0", "--frames", "8"], "from 1 to 65535 pixels"),
    (["qwen2-vl-7b", "--image", "10x2010"], "up to 200:1"),
    (["qwen2-vl-7b", "--video", "3000x10", "--frames", "2"], "up to 200:1"),
    (["qwen2-vl-7b", "--image", "1280x720", "--min-pixels", "1000000", "--max-pixels", "921600"],
     "from 1 to --max-pixels (921600)"),
    (["qwen2-vl-7b", "--image", "1280x720", "--min-pixels", "0"], "from 1 to"),
    (["qwen2-vl-7b", "--image", "1280x720", "--max-pixels", "500"], "at least 784"),
    (["qwen2-vl-7b", "--image", "1280x720", "--patches", "4100"], "positive multiple of 16"),
    (["qwen2-vl-7b", "--image", "1280x720", "--patches", "4100"], "e.g. 4096 or 4112"),
    (["qwen2-vl-7b", "--image", "1280x720", "--patches", "-16"], "e.g. 16 or 32"),
    (["qwen2-vl-7b", "--image", "1280x720", "--patches", "4096", "--target", "tpu-mlir"], "--target vamc"),
    (["qwen2-vl-7b", "--image", "1280x720", "--frames", "8"], "--frames goes with --video"),
    (["qwen2-vl-7b", "--video", "1280x720"], "needs --frames"),
    (["qwen2-vl-7b", "--video", "1280x720", "--frames", "0"], "at least 1 frame"),
    (["qwen2-vl-7b"], "give --image"),
    (["qwen2-vl-7b", "--image", "1280x720", "--target", "gpu"], "choose vamc, tpu-mlir, paddle-inference"),
    (["qwen2-vl-7b", "--image", "1280x720", "--prompt-tokens", "-1"], "1 or more"),
    (["qwen2-vl-7b", "--image", "1280x720", "--prompt-tokens", "0"], "1 or more"),
    (["qwen2-vl-7b", "--image", "1280x720", "--answer-tokens", "0"], "1 or more"),
    (["qwen2-vl-7b", "--image", "1920x1080", "--answer-tokens", "40000"], "max_position_embeddings"),
    (["qwen2-vl-8b", "--image", "1280x720"], "qwen2-vl-7b"),
    (["./no-such-dir", "--image", "1280x720"], "no such file or directory"),
])
def test_bad_input_is_one_line_exit_2(args: list[str], says: str) -> None:
    result = CliRunner().invoke(app, ["plan", *args])
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], result.stderr


def test_error_from_the_real_entry_point_has_no_traceback() -> None:
    # the real entry point, a fresh interpreter: what a user's shell sees
    result = run_vlhub_subprocess("plan", "qwen-vl-7b", "--image", "448x448", "--target", "vamc")
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: Qwen-VL (v1) has no vamc route")


# Every command plan prints is one convert accepts, with the numbers convert itself would choose


class _Accepted(Exception):
    """Raised where `vlhub convert`, every option checked, would start downloading the model."""


PLANNED = [
    # the defect: N given as 5120 is 1280 tokens, so vamc's prefill is 1280 + 128 = 1408 (convert refused the
    # image's 1196 + 128 -> 1328 that plan printed)
    ["qwen2-vl-7b", "--image", "1280x720", "--patches", "5120"],
    ["qwen2-vl-7b", "--image", "1280x720", "--max-pixels", "921600", "--patches", "4096"],
    ["qwen2-vl-7b", "--image", "1280x720", "--prompt-tokens", "16", "--answer-tokens", "64"],
    ["qwen2-vl-7b", "--image", "1920x1080"],  # N 10768, past the 8192 vlhub builds: no vamc command
    ["qwen2.5-vl-3b", "--video", "640x360", "--frames", "8", "--answer-tokens", "32"],
    ["qwen2-vl-2b", "--image", "448x448", "--patches", "8192"],
    ["qwen2.5-vl-72b", "--image", "200x5000"],
    ["qwen-vl-chat-7b", "--image", "1280x720"],
    ["qwen-vl-chat-7b", "--image", "448x448", "--answer-tokens", "1600"],  # 384 + 1600 -> 1984 of seq_length 2048
]


def _commands(*args: str) -> dict[str, str | None]:
    """The `vlhub convert` command plan prints per target (None where it prints none)."""
    result = CliRunner().invoke(app, ["plan", *args, "--json"])
    assert result.exit_code == 0, result.stderr
    return {target: entry["command"] for target, entry in json.loads(result.stdout)["targets"].items()}


@pytest.mark.parametrize("args", PLANNED, ids=" ".join)
def test_every_printed_command_is_accepted_by_convert(args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def accepted(spec: object) -> None:
        raise _Accepted

    monkeypatch.setattr(convert_command, "download_for", accepted)
    commands = _commands(*args)
    for command in filter(None, commands.values()):
        argv = shlex.split(command)
        assert argv[:2] == ["vlhub", "convert"]
        result = CliRunner().invoke(app, argv[1:])
        assert isinstance(result.exception, _Accepted), f"{command}: {result.stderr}"
    assert (commands.get("vamc") is None) == ("1920x1080" in args or "qwen-vl-chat-7b" in args)


def test_printed_commands_run_on_tiny_models() -> None:
    """The commands as printed, run to the end (into the session's cache) with their default smoke tests."""
    # 168x112 is the smoke image: 96 patches, 24 tokens; prefill 24 + 128 -> 160, context 160 + 512 = 672
    commands = _commands("tiny-qwen2.5-vl", "--image", "168x112")
    assert commands["tpu-mlir"] == "vlhub convert tiny-qwen2.5-vl --to tpu-mlir --seq-length 672 --max-pixels 168x112"
    # 56x56: N 16, below the smoke image's 96 patches: the vamc smoke test cannot run on it, the command says so
    small = _commands("tiny-qwen2-vl", "--image", "56x56", "--target", "vamc")["vamc"]
    assert small is not None and small.endswith(" --no-smoke")
    for command in [*commands.values(), small]:
        assert command is not None
        result = run_vlhub(*shlex.split(command)[1:])
        assert result.returncode == 0, f"{command}: {result.stderr}"
