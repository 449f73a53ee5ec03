"""The architecture holds: the import contracts in pyproject.toml (layers, families and targets independent of
each other, no cycles), and a family's name appears in code only in its own folder (and the registry's data)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO
from vlhub.family_registry import FAMILIES

PACKAGE = REPO / "vlhub"


def test_import_contracts_hold() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")  # the console script beside this Python
    result = subprocess.run([str(lint_imports), "--no-cache"], capture_output=True, text=True, cwd=PACKAGE.parent,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]


def _code_strings(tree: ast.AST) -> list[tuple[int, str]]:
    """Identifiers and string constants, docstrings left out (they may say which family they describe)."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant) and isinstance(node.body[0].value.value, str)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found.append((node.lineno, node.value))
        elif isinstance(node, ast.Name):
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            found.append((node.lineno, node.attr))
    return found


def test_a_family_is_named_only_in_its_folder() -> None:
    """Code outside `vlhub/families/<family>/` never branches on a family: its folder name and model_type appear in
    no identifier or string there (vendor file paths and key prefixes such as `qwen.` in text aside)."""
    names = {family.name: family for family in FAMILIES.values()}
    patterns = {name: re.compile(rf"(?<![\w/-])({re.escape(name)}|{re.escape(family.model_type)})(?![\w/.-])")
                for name, family in names.items()}
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        for line, text in _code_strings(ast.parse(path.read_text())):
            for name, pattern in patterns.items():
                if pattern.search(text) and parts[:2] != ("families", name):
                    offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line} {name}: {text[:60]!r}")
    assert not offenders, "\n".join(offenders)
