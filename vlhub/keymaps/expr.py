"""A tiny, safe evaluator for the arithmetic in key maps: `hidden // heads`, `int(width * mlp_ratio)`,
`not tied`, `layer in full_layers`. Names, numbers, + - * / //, comparisons (in, not in too), and/or/not and int();
nothing else parses."""

from __future__ import annotations

import ast
import operator
from collections.abc import Mapping
from functools import cache

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge,
            ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}


@cache
def _parse(text: str) -> ast.expr:
    return ast.parse(text, mode="eval").body


def evaluate(text: str, names: Mapping[str, object]) -> object:
    """The value of `text` with `names` bound; a ValueError names anything not allowed or unknown."""
    return _eval(_parse(text), names, text)


def names_in(text: str) -> frozenset[str]:
    """The names an expression reads."""
    return frozenset(node.id for node in ast.walk(_parse(text)) if isinstance(node, ast.Name))


def _eval(node: ast.expr, names: Mapping[str, object], text: str) -> object:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, bool)):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in names:
            raise ValueError(f"unknown name {node.id!r} in {text!r}")
        return names[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_eval(node.left, names, text), _eval(node.right, names, text))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return not _eval(node.operand, names, text)
    if isinstance(node, ast.BoolOp):
        values = [_eval(v, names, text) for v in node.values]
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARE:
        return _COMPARE[type(node.ops[0])](_eval(node.left, names, text), _eval(node.comparators[0], names, text))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "int"
            and len(node.args) == 1 and not node.keywords):
        return int(_eval(node.args[0], names, text))  # type: ignore[call-overload]
    raise ValueError(f"not allowed in a key map expression: {ast.unparse(node)!r} in {text!r}")
