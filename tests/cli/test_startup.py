"""`vlhub --help` and `vlhub --version` import no command (issue 20: start-up within 0.5 s; the figures are
benchmarks/bench_startup.py's, not these tests'): each command's module is imported when it runs or shows its own
help (vlhub.cli._lazy). What a start-up imports is checked on the real entry point, in a fresh interpreter; the app
is checked against the same commands registered the eager way, so the lazy one shows and does the same."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from vlhub.cli._lazy import HELP_SETTINGS
from vlhub.cli.app import COMMANDS, app

# what a start-up that runs no command must not import: the commands' modules and what they need (numpy, the
# targets' registry, the conversion engine), nor the heavy runtimes
NOT_AT_START_UP = ("numpy", "vlhub.targets", "vlhub.convert", "vlhub.deploy", "vlhub.cli._options", "paddle", "torch")


def _imported(args: list[str], tmp_path: Path) -> tuple[int, str, set[str]]:
    """Run the console script's entry point with `args` in a fresh interpreter: its exit code, its output (stdout,
    then stderr: with no arguments the help is a usage error, on stderr as `hf` and click print it) and the
    modules it had imported when it exited."""
    out = tmp_path / "modules.json"
    code = ("import atexit, json, sys\n"
            f"atexit.register(lambda: open({str(out)!r}, 'w').write(json.dumps(sorted(sys.modules))))\n"
            f"sys.argv = ['vlhub', *{args!r}]\n"
            "from vlhub.cli.entry import main\n"
            "main()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    return result.returncode, result.stdout + result.stderr, set(json.loads(out.read_text()))


def _heavy(modules: set[str], roots: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == root or m.startswith(root + ".") for root in roots))


@pytest.mark.parametrize("args", [["--help"], ["--version"], []], ids=["--help", "--version", "no arguments"])
def test_start_up_imports_no_command(args: list[str], tmp_path: Path) -> None:
    code, stdout, modules = _imported(args, tmp_path)
    assert code == (2 if not args else 0)  # no arguments: the help, as a usage error (click's no_args_is_help)
    assert ("vlhub 0.1.0" if args == ["--version"] else "dump-embeddings") in stdout
    assert _heavy(modules, NOT_AT_START_UP) == []
    commands = sorted(where.partition(":")[0] for where in COMMANDS.values())
    assert [m for m in commands if m in modules] == []


def test_a_command_without_target_flags_does_not_import_the_targets(tmp_path: Path) -> None:
    """`vlhub models --help` imports its module, not the targets' registry the shared options come with."""
    code, stdout, modules = _imported(["models", "--help"], tmp_path)
    assert code == 0 and "--json" in stdout
    assert "vlhub.cli.models" in modules
    assert _heavy(modules, ("vlhub.targets", "vlhub.deploy", "vlhub.cli.convert")) == []


def test_a_command_imports_its_module_when_it_shows_its_help(tmp_path: Path) -> None:
    code, stdout, modules = _imported(["convert", "--help"], tmp_path)
    assert code == 0 and "--to" in stdout and "--dtype" in stdout  # a target's flag, from the registry
    assert {"vlhub.cli.convert", "vlhub.targets"} <= modules
    assert "vlhub.cli.keys" not in modules


def _eager_app() -> typer.Typer:
    """The same app with every command registered the usual way (its module imported now)."""
    eager = typer.Typer(name=app.info.name, help=app.info.help, epilog=app.info.epilog, no_args_is_help=True,
                        pretty_exceptions_enable=False, add_completion=False, rich_markup_mode=None,
                        context_settings=HELP_SETTINGS)
    assert app.registered_callback is not None
    eager.callback()(app.registered_callback.callback)
    for name, where in COMMANDS.items():
        module, _, attribute = where.partition(":")
        found = getattr(importlib.import_module(module), attribute)
        if isinstance(found, typer.Typer):
            eager.add_typer(found, name=name, context_settings=HELP_SETTINGS)
        else:
            eager.command(name=name, context_settings=HELP_SETTINGS)(found)
    return eager


@pytest.mark.parametrize("args", [
    ["--help"], [], ["--version"], ["conver"], ["convert", "--help"], ["cache", "--help"], ["cache"],
    ["cache", "ls", "--help"], ["cache", "nope"], ["models", "--nope"], ["inspect"], ["dump-embeddings", "--help"],
    ["convert", "tiny-qwen2-vl", "--to", "no-such-target"], ["-h"], ["convert", "-h"], ["cache", "ls", "-h"],
], ids=" ".join)
def test_the_lazy_app_shows_and_does_what_the_eager_one_does(args: list[str]) -> None:
    eager, lazy = (CliRunner().invoke(each, args, prog_name="vlhub") for each in (_eager_app(), app))
    assert (lazy.exit_code, lazy.stdout, lazy.stderr) == (eager.exit_code, eager.stdout, eager.stderr)


def test_the_summaries_read_from_the_source_are_the_commands_help() -> None:
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    assert list(group.list_commands(None)) == list(COMMANDS)  # type: ignore[arg-type]
    for name in COMMANDS:
        command = group.commands[name]
        read = command.help  # from the source: the module is not made into a command yet
        assert read and read == command.real().help, name  # type: ignore[attr-defined]
