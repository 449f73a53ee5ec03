"""Commands registered by name and imported when they run, so `vlhub --help` and `vlhub --version` import no command.

Each command is registered on the Typer app as usual (`app.registered_commands` lists them all, in order), but with
a light stand-in for its function: the app's group is built without importing a single command module. The command
itself (a `LazyCommand`) imports its module when it is about to run or show its own help: it then hands over to the
command typer makes of the real function (or of a Typer app of sub-commands), so options, help, errors and exit
codes are typer's own. The one-line summaries `vlhub --help` lists are read from the source (the function's
docstring, or the sub-app's `help=`), without importing it.

The real command calls the function through what is registered on the app, so a callback wrapped there (as
tests/cli/test_signals.py does) wraps the real one.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from typer import _click
from typer.core import TyperCommand
from typer.models import CommandInfo, TyperInfo

_UNREAD = object()  # a summary not derived yet

# `-h` as well as `--help`, as `hf` and most tools take it, and help as wide as the terminal up to 120 columns, as
# `hf` prints it (click's own limit is 80): on the app, each command and each group of sub-commands
HELP_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 120}


@dataclass(frozen=True)
class _Target:
    """Where a command's function (or Typer app) is, `module:attribute`, and the app's settings typer passes on."""

    module: str
    attribute: str
    pretty_exceptions_short: bool
    suggest_commands: bool

    def load(self) -> Any:
        return getattr(importlib.import_module(self.module), self.attribute)


def add_lazy_commands(app: typer.Typer, commands: dict[str, str]) -> None:
    """Register `name: "module:attribute"` commands on `app`, in order: a command function, or a Typer app whose
    commands become that name's sub-commands (as `app.add_typer(sub, name=name)` would)."""
    for name, where in commands.items():
        module, _, attribute = where.partition(":")
        target = _Target(module, attribute, app.pretty_exceptions_short, app.suggest_commands)
        app.command(name=name, cls=LazyCommand, context_settings=HELP_SETTINGS)(_stand_in(target))


def _stand_in(target: _Target) -> Callable[..., Any]:
    """What is registered for a command: named after its function, with no parameters typer would read; called
    with the real function's arguments, it calls the real function."""

    def stand_in(**kwargs: Any) -> Any:
        return target.load()(**kwargs)

    stand_in.__name__ = stand_in.__qualname__ = target.attribute
    stand_in.__module__ = target.module
    stand_in.__signature__ = inspect.Signature()  # type: ignore[attr-defined]
    stand_in.lazy_target = target  # type: ignore[attr-defined]
    return stand_in


class LazyCommand(TyperCommand):
    """A command of the root group that imports its module only when it is used: its summary in the group's help
    is read from the source; anything else goes to the real command, made on first use."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._help: Any = _UNREAD
        super().__init__(*args, **kwargs)
        self._real: _click.Command | None = None

    # the help typer gives it is the stand-in's (none): until the real command is made, the one read from the source
    @property  # type: ignore[override]
    def help(self) -> str | None:
        if self._real is None and self._help is _UNREAD:
            self._help = _source_help(self._target())
        if self._real is None and self._help is not None:
            return self._help
        return self.real().help  # made, or the source did not say

    @help.setter
    def help(self, value: str | None) -> None:
        self._help = _UNREAD if value is None else value

    def _registered(self) -> Callable[..., Any]:
        """The function the app holds for this command: the stand-in, or what wrapped it since."""
        assert self.callback is not None
        return self.callback.__wrapped__  # typer's callback wraps the registered function (functools.wraps)

    def _target(self) -> _Target:
        return inspect.unwrap(self._registered()).lazy_target  # type: ignore[attr-defined]

    def real(self) -> _click.Command:
        """The command typer makes of the real function or Typer app (importing its module), made once."""
        if self._real is None:
            target = self._target()
            found = target.load()
            if isinstance(found, typer.Typer):
                self._real = typer.main.get_group_from_info(
                    TyperInfo(found, name=self.name, context_settings=HELP_SETTINGS),
                    pretty_exceptions_short=target.pretty_exceptions_short,
                    rich_markup_mode=self.rich_markup_mode, suggest_commands=target.suggest_commands)
            else:
                registered = self._registered()

                @functools.wraps(found)  # its parameters are the real function's; the call goes through the app's
                def call(**kwargs: Any) -> Any:
                    return registered(**kwargs)

                self._real = typer.main.get_command_from_info(
                    CommandInfo(name=self.name, callback=call, context_settings=HELP_SETTINGS),
                    pretty_exceptions_short=target.pretty_exceptions_short,
                    rich_markup_mode=self.rich_markup_mode)
        return self._real

    # the group calls `make_context` and then invokes the context's command: from there on it is the real one
    def make_context(self, info_name: str | None, args: list[str], parent: _click.Context | None = None,
                     **extra: Any) -> _click.Context:
        return self.real().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: _click.Context) -> Any:
        return self.real().invoke(ctx)

    def parse_args(self, ctx: _click.Context, args: list[str]) -> list[str]:
        return self.real().parse_args(ctx, args)

    def get_params(self, ctx: _click.Context) -> list[_click.Parameter]:
        return self.real().get_params(ctx)

    def get_usage(self, ctx: _click.Context) -> str:
        return self.real().get_usage(ctx)

    def format_help(self, ctx: _click.Context, formatter: _click.HelpFormatter) -> None:
        self.real().format_help(ctx, formatter)

    def shell_complete(self, ctx: _click.Context, incomplete: str) -> list[Any]:
        return self.real().shell_complete(ctx, incomplete)


@functools.cache
def _module_tree(module: str) -> ast.Module | None:
    spec = importlib.util.find_spec(module)  # imports the parent packages only: vlhub.cli, light
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    return ast.parse(Path(spec.origin).read_bytes())


def _source_help(target: _Target) -> str | None:
    """The help typer would give the target, read from its module's source without importing it: the function's
    docstring, or the `help=` a Typer app is made with; None when the source does not say plainly."""
    tree = _module_tree(target.module)
    for node in tree.body if tree is not None else ():
        if isinstance(node, ast.FunctionDef) and node.name == target.attribute:
            return ast.get_docstring(node)
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                and any(isinstance(each, ast.Name) and each.id == target.attribute for each in node.targets)):
            for keyword in node.value.keywords:
                if keyword.arg == "help":
                    try:
                        return ast.literal_eval(keyword.value)
                    except ValueError:
                        return None
            return None
    return None
