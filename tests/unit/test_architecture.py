"""The architecture holds: the import contracts in pyproject.toml (layers, families and targets independent of
each other, no cycles), and a family's name appears in code only in its own folder (and the registry's data).
In the tests, no test module imports another (they share tests/helpers.py and conftest.py's fixtures)."""

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
    """Code outside `vlhub/families/<family>/` never branches on a family: its folder name and model types appear in
    no identifier or string there (vendor file paths and key prefixes such as `qwen.` in text aside)."""
    names = {family.name: family for family in FAMILIES.values()}
    patterns = {name: re.compile(rf"(?<![\w/-])({'|'.join(map(re.escape, {name, *family.keymap.model_types}))})"
                                 r"(?![\w/.-])")
                for name, family in names.items()}
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        for line, text in _code_strings(ast.parse(path.read_text())):
            for name, pattern in patterns.items():
                if pattern.search(text) and parts[:2] != ("families", name):
                    offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line} {name}: {text[:60]!r}")
    assert not offenders, "\n".join(offenders)


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """Every module name an import statement names, with each name it imports from one (which may be a module)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def test_no_test_module_imports_another() -> None:
    """Tests share code through tests/helpers.py, conftest.py's fixtures and helper modules (the fake hubs, the
    conformance suite's factory and judge), never by importing a test module or a conftest: each test module
    stands alone, and pytest collects a test function where it is defined, once."""
    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        for line, module in _imported_modules(ast.parse(path.read_text())):
            if any(part.startswith("test_") or part == "conftest" for part in module.split(".")):
                offenders.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert not offenders, "\n".join(offenders)
