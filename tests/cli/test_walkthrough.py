"""docs/walkthrough.md, run as a user runs it: every `$ ` command of its console blocks in order, in a shell, against
the fake hub serving the checkpoint the page names (a Qwen2.5-VL that transformers saved from a tiny config), with
fresh caches. Each command must exit as the page shows (`$ echo $?` after it, else 0), print every line the page shows
for it in the page's order (stdout's lines, then stderr's: the page shows them as a terminal interleaves them, so
a command whose shown lines mix the two is compared stream by stream), and a `find` listing must hold exactly the
files the page lists. Lines are compared
with the run's paths and the mirror's URL put in, digits masked (times, dates, free memory vary) and spaces collapsed
(table widths vary): not byte for byte."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conformance.factory import FRESH, save_checkpoint
from tests.fake_hub import FakeHub

DOC = Path(__file__).resolve().parents[2] / "docs" / "walkthrough.md"
# what the page's run used, replaced by this run's
PAGE_MIRROR = "http://127.0.0.1:8765"
PAGE_HOME = "/tmp/walk-home"
PAGE_CWD = "/tmp/walk-work"
REPO = "tiny-org/Qwen2.5-VL-Tiny"
SKIPPED = "..."  # a line the page puts where it leaves lines out


@dataclass
class Step:
    """One `$ command` of the page, the output lines it shows and the exit code it says."""

    command: str
    shown: list[str] = field(default_factory=list)
    code: int = 0


def page_steps(text: str) -> list[Step]:
    """The commands of the page's console blocks, in order; `$ echo $?` sets the previous command's code."""
    steps: list[Step] = []
    for block in re.findall(r"^```console\n(.*?)^```", text, re.DOTALL | re.MULTILINE):
        lines = iter(block.splitlines())
        for line in lines:
            if line == "$ echo $?":
                steps[-1].code = int(next(lines))
            elif line.startswith("$ "):
                steps.append(Step(line[2:]))
            else:
                steps[-1].shown.append(line)
    return steps


def comparable(line: str) -> str:
    return " ".join(re.sub(r"\d+", "#", line).split())


@pytest.fixture(scope="module")
def mirror(module_tmp: Callable[[str], Path]) -> Iterator[FakeHub]:
    checkpoint = module_tmp("walkthrough-model")
    save_checkpoint(FRESH["qwen2_5_vl"], checkpoint)
    with contextlib.closing(FakeHub()) as hub:
        hub.add_directory(REPO, checkpoint)
        yield hub


def test_the_walkthrough_runs_as_the_page_shows(mirror: FakeHub, tmp_path: Path) -> None:
    home, cwd = tmp_path / "home", tmp_path / "work"
    cwd.mkdir()
    env = {**os.environ, "HF_HOME": str(home / "hf"), "VLHUB_HOME": str(home / "vlhub"),
           "HF_HUB_DISABLE_TELEMETRY": "1"}

    def here(text: str) -> str:
        return text.replace(PAGE_MIRROR, mirror.url).replace(PAGE_HOME, str(home)).replace(PAGE_CWD, str(cwd))

    steps = page_steps(DOC.read_text())
    assert steps[0].command == f"export HF_ENDPOINT={PAGE_MIRROR}"  # the mirror this test stands in for
    ran = 0
    for step in steps:
        command = here(step.command)
        if command.startswith("export "):
            name, _, value = command.removeprefix("export ").partition("=")
            env[name] = value
            continue
        # this interpreter's vlhub, whatever is on PATH
        command = re.sub(r"(^|\s)vlhub ", rf"\1{shlex.quote(sys.executable)} -m vlhub ", command)
        result = subprocess.run(["bash", "-c", command], check=False, cwd=cwd, env=env, capture_output=True, text=True,
                                timeout=120)
        ran += 1
        streams = [[comparable(line) for line in text.splitlines()] for text in (result.stdout, result.stderr)]
        assert result.returncode == step.code, f"{step.command}: exit {result.returncode}\n{result.stderr}"
        shown = [here(line) for line in step.shown if line != SKIPPED]
        if step.command.startswith("find "):
            assert sorted(result.stdout.splitlines()) == sorted(shown), step.command  # `sort` follows the locale
            continue
        # every line the page shows, in the page's order within its stream (lines it leaves out, `...`, between)
        found = [0, 0]  # where the next line of stdout, of stderr, is looked for
        for line in shown:
            wanted = comparable(line)
            stream = next((i for i in (0, 1) if wanted in streams[i][found[i]:]), None)
            assert stream is not None, f"{step.command}: no {line!r} (in this order) in\n{result.stdout}{result.stderr}"
            found[stream] += streams[stream][found[stream]:].index(wanted) + 1
    assert ran >= 10
