"""Options several commands share, declared once, and the targets' own flags, made from the registry (imported by
the commands that take them, not by every command that shares an option: it imports numpy and every target)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from dataclasses import Field, dataclass, fields
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, get_args, get_type_hints

import typer

from vlhub.errors import UserError

if TYPE_CHECKING:
    from vlhub.deploy.target import Target

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
SourceArg = Annotated[
    str,
    typer.Argument(
        metavar="SRC",
        help="A catalog name (e.g. tiny-qwen2-vl, qwen2-vl-7b), a repo id, a checkpoint directory or a weight file.",
        show_default=False,
    ),
]

F = TypeVar("F", bound=Callable[..., Any])


def choices(names: Iterable[str]) -> str:
    """The placeholder of an option that takes one of `names`, as click shows choices: `[paddle|safetensors|...]`.
    The command refuses anything else in its own one line (click's refusal is four)."""
    return f"[{'|'.join(names)}]"


def _declared(smoke: bool) -> dict[str, list[tuple[Target, Field, Any]]]:
    """Every flag the targets' options (smoke options, with `smoke`) declare: its declarations, by flag name."""
    from vlhub.targets import TARGETS

    found: dict[str, list[tuple[Target, Field, Any]]] = {}
    for target in TARGETS.values():
        cls = target.smoke_options if smoke else target.options
        if cls is None:
            continue
        hints = get_type_hints(cls)
        for each in fields(cls):
            found.setdefault(each.name, []).append((target, each, hints[each.name]))
    return found


def _metavar(declared: list[str | None]) -> str | None:
    """One placeholder for what the targets' declarations say: choices (`[a|b]`) merged into one list of every
    word any target takes, once (--dtype: `[bfloat16|float16|float32]`); other placeholders joined (`N|WxH`)."""
    given = list(dict.fromkeys(each for each in declared if each))
    if given and all(each.startswith("[") and each.endswith("]") for each in given):
        return choices(dict.fromkeys(word for each in given for word in each[1:-1].split("|")))
    return "|".join(given) or None


def _parameter(name: str, declarations: list[tuple[Target, Field, Any]]) -> inspect.Parameter:
    """The typer parameter of one flag: its help, per target when several take it with different meanings."""
    hint = declarations[0][2]
    assert all(declared == hint for _, _, declared in declarations), f"--{name} is typed differently by targets"
    by_help: dict[str, list[str]] = {}
    for target, each, _ in declarations:
        by_help.setdefault(each.metadata["help"], []).append(target.name)
    helps = [f"{', '.join(names)}: {text}" for text, names in by_help.items()]
    option = typer.Option("--" + name.replace("_", "-"), help=" ".join(helps), show_default=False,
                          metavar=_metavar([each.metadata["metavar"] for _, each, _ in declarations]))
    if hint is bool:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=False,
                                 annotation=Annotated[bool, option])
    if getattr(hint, "__origin__", None) is tuple:  # repeatable
        hint = list[get_args(hint)[0]]  # type: ignore[misc]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[hint | None, option])


@dataclass(frozen=True)
class TargetFlags:
    """What was typed of the targets' flags (name -> value; a repeated one as a tuple): their options' and their
    smoke tests'."""

    options: dict[str, Any]
    smoke: dict[str, Any]


def with_target_flags(*, options: bool, smoke: bool) -> Callable[[F], F]:
    """Give a command every target's flags (its options' with `options`, its smoke test's with `smoke`); the
    command takes what was typed of them as its `flags: TargetFlags` parameter."""
    declared = {"options": _declared(False) if options else {}, "smoke": _declared(True) if smoke else {}}

    def wrap(command: F) -> F:
        own = inspect.signature(command, eval_str=True)
        kept = [p for p in own.parameters.values() if p.name != "flags"]
        added = [_parameter(name, each) for kind in declared.values() for name, each in kind.items()]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            given = {kind: {name: _typed(kwargs.pop(name)) for name in names} for kind, names in declared.items()}
            flags = TargetFlags(**{kind: {name: value for name, value in values.items() if value is not None}
                                   for kind, values in given.items()})
            return command(**kwargs, flags=flags)

        wrapper.__signature__ = own.replace(parameters=[*kept, *added])  # type: ignore[attr-defined]
        wrapper.__annotations__ = {**{k: v for k, v in command.__annotations__.items() if k != "flags"},
                                   **{p.name: p.annotation for p in added}}
        return wrapper  # type: ignore[return-value]

    return wrap


def _typed(value: Any) -> Any:
    """A flag's value as typed (a repeated one as a tuple), or None when it was not."""
    if value is None or value is False or value == []:
        return None
    return tuple(value) if isinstance(value, list) else value


def target_options(target: Target, flags: dict[str, Any], *, smoke: bool = False) -> Any:
    """The target's options (smoke options, with `smoke`) from the typed flags, refusing a flag of other targets
    (`--x does not apply to --to T (it applies to --to U): drop --x`)."""
    from vlhub.targets import options_of, takers

    cls = target.smoke_options if smoke else target.options
    accepted = {each.name for each in fields(cls)} if cls is not None else set()
    for name in flags:
        if name not in accepted:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} does not apply to --to {target.name} (it applies to --to "
                            f"{', '.join(takers(name, smoke=smoke))}): drop {flag}")
    return options_of(cls, flags)

