"""Help as the tools vlhub's users already know print it (`hf`, click): `-h` beside `--help` on every command and
sub-command, flags without a value placeholder, choices listed, text wrapped to the terminal, exit codes listed
(issue 21)."""

from __future__ import annotations

import re
from collections.abc import Callable
from itertools import pairwise

import pytest
import typer
from typer.testing import CliRunner

from vlhub.cli.app import app
from vlhub.targets import TARGETS, layouts


def _command_paths() -> list[list[str]]:
    """Every command and sub-command, as the words that name it (the app itself: [])."""
    group = typer.main.get_command(app)
    paths: list[list[str]] = [[]]
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        paths.append([name])
        real = command.real()
        for sub in getattr(real, "commands", {}):
            paths.append([name, sub])
    return paths


PATHS = _command_paths()


@pytest.fixture
def help_of(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Callable[..., str]:
    """The help `vlhub ARGS` prints on a terminal COLUMNS wide (run in this process, as the console script runs
    it: CliRunner would force 80 columns)."""

    def run(args: list[str], columns: int = 80) -> str:
        monkeypatch.setenv("COLUMNS", str(columns))
        with pytest.raises(SystemExit) as exit:
            app(args, prog_name="vlhub")
        out, err = capsys.readouterr()
        assert exit.value.code == 0 and not err, (args, err)
        return out

    return run


def test_every_command_and_sub_command_is_listed() -> None:
    assert ["cache", "ls"] in PATHS and ["convert"] in PATHS and len(PATHS) > 12


@pytest.mark.parametrize("path", PATHS, ids=lambda path: " ".join(path) or "vlhub")
def test_minus_h_is_help_and_flags_show_no_value(path: list[str], help_of: Callable[..., str]) -> None:
    """`-h` prints what `--help` does; no flag shows a value placeholder (typer's rich panels printed
    `--json <bool>`)."""
    text = help_of([*path, "-h"])
    assert text == help_of([*path, "--help"])
    assert text.startswith(f"Usage: vlhub {' '.join(path)}".rstrip())
    assert "-h, --help  " in text and "<bool>" not in text and "<int range>" not in text, text
    assert not re.search(r"--(json|dry-run|overwrite|no-smoke|strict|smoke|onnx|version)\s+<", text)


@pytest.mark.parametrize("columns", [80, 120])
@pytest.mark.parametrize("path", PATHS, ids=lambda path: " ".join(path) or "vlhub")
def test_help_is_wrapped_to_the_terminal(path: list[str], columns: int, help_of: Callable[..., str]) -> None:
    """No line passes the width; the description's paragraphs are filled (each line but a paragraph's last
    takes words until the next would not fit: the docstrings' own line breaks are not kept)."""
    text = help_of([*path, "-h"], columns)
    width = min(columns, 120) - 2  # as wide as the terminal, up to 120 columns as `hf` prints it
    assert max(len(line) for line in text.splitlines()) <= width, text
    description = text.split("\n\n", 1)[1].split("\n\nArguments:")[0].split("\n\nOptions:")[0]
    for paragraph in description.split("\n\n"):
        lines = paragraph.splitlines()
        for line, following in pairwise(lines):
            assert len(line) + 1 + len(following.split()[0]) > width, (line, following)


def test_the_commands_list_has_one_line_each(help_of: Callable[..., str]) -> None:
    listing = help_of(["-h"]).split("Commands:\n")[1].split("\n\n")[0].splitlines()
    group = typer.main.get_command(app)
    assert [line.split()[0] for line in listing] == list(group.commands)  # type: ignore[attr-defined]


def test_a_wide_terminal_shows_whole_summaries(help_of: Callable[..., str]) -> None:
    """At 120 columns, as `hf -h` prints it, a summary of up to 90 characters is not cut (click stops at 80)."""
    assert "download         Download a model as `hf download` does and print its path.\n" in help_of(["-h"], 120)


def test_choices_are_listed(help_of: Callable[..., str]) -> None:
    every = "|".join(TARGETS)
    assert f"--to [{every}]" in help_of(["convert", "-h"])
    assert f"--target [{every}]" in help_of(["smoke", "-h"])
    assert f"--target [auto|{every}]" in help_of(["check", "-h"])
    assert f"--target [{'|'.join(t.name for t in layouts())}]" in help_of(["plan", "-h"])


def test_options_with_a_few_values_list_them(help_of: Callable[..., str]) -> None:
    """An option that takes one of a few words shows them, not `<str>`; one several targets take shows every
    word any of them takes, once."""
    convert = help_of(["convert", "-h"])
    for option in ("--dtype [bfloat16|float16|float32|float64]", "--ir [pir|legacy]", "--chip [bm1684x|bm1688]",
                   "--quantize [w4bf16|w8bf16|bf16|w4f16|w8f16|f16]"):
        assert option in convert, convert
    embeddings = help_of(["dump-embeddings", "-h"])
    assert "--dtype [float16|bfloat16|float32]" in embeddings and "--format [bin|npy]" in embeddings, embeddings


@pytest.mark.parametrize("args", [["convert", "tiny-qwen2-vl", "--to", "padle"],
                                  ["plan", "tiny-qwen2-vl", "--image", "64x64", "--target", "padle"],
                                  ["check", ".", "--target", "padle"],
                                  ["smoke", "tiny-qwen2-vl", "--target", "padle"]], ids=lambda args: args[0])
def test_a_value_outside_the_choices_is_refused_in_one_line(args: list[str]) -> None:
    result = CliRunner().invoke(app, args, prog_name="vlhub")
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "'padle'" in result.stderr and "paddle" in result.stderr.replace("'padle'", "")


def test_the_exit_codes_are_listed(help_of: Callable[..., str]) -> None:
    text = help_of(["-h"])
    epilog = text.split("Exit codes:")[1]
    for code, meaning in (("0", "done"), ("1", "check or smoke test failed"), ("2", "bad input"),
                          ("3", "the hub could not be reached (network)"), ("130", "interrupted")):
        assert re.search(rf"^\s+{code}\s+.*{re.escape(meaning)}", epilog, re.MULTILINE), (code, epilog)
