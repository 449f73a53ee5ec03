"""The model families: one folder each, `vlhub/families/<family>/`, holding its key map (`keymap.toml`: every
official tensor, its shape and the layouts it is stored in), its facts (`family.toml`: what each deployment target
needs to know of it) and its code (the smoke input, the numpy reference and the Paddle network).

This module is the registry: a family is a folder that holds a key map, found by looking, so adding one never
edits a list. It imports no family's code; `Family.code` does, when asked.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from types import ModuleType

from vlhub.errors import UserError
from vlhub.keymaps import FAMILY_FILES, KeyMap, keymap_of_config, load_keymap

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Family:
    """A model family, described by its folder's key map and facts."""

    name: str

    @cached_property
    def keymap(self) -> KeyMap:
        return load_keymap(self.name)

    @cached_property
    def facts(self) -> dict:
        """`family.toml`: the family's display name and, per deployment target, what that target needs."""
        path = resources.files(__package__) / self.name / "family.toml"
        return tomllib.loads(path.read_text()) if path.is_file() else {}

    @property
    def display_name(self) -> str:
        return self.facts.get("display_name", self.name)

    def target_facts(self, target: str) -> dict | None:
        """What `target` needs to know of this family (its `[targets.<target>]` table), or None when the family
        has no route to it."""
        return (self.facts.get("targets") or {}).get(target)

    def code(self, module: str) -> ModuleType:
        """One module of the family's code (`inputs`, `reference`, `paddle`), imported on first use: the registry
        itself imports none, so `import vlhub` stays light and a family's numpy or Paddle code loads only when
        a forward of that family runs."""
        return importlib.import_module(f"{__package__}.{self.name}.{module}")

    @property
    def model_type(self) -> str:
        return self.keymap.model_type

    @property
    def architecture(self) -> str:
        return self.keymap.architecture

    @property
    def checkpoint_format(self) -> str:
        """The format the official upload uses (torch .bin or safetensors)."""
        return self.keymap.checkpoint_format

    def official_tensors(self, config: dict) -> list[tuple[str, Shape]]:
        """Every tensor of the official checkpoint for this config, in official order, with its shape."""
        return [(t.name, t.shape) for t in self.keymap.expected(config)]


FAMILIES: dict[str, Family] = {name: Family(name) for name in FAMILY_FILES}


def family_of_config(config: dict | None) -> Family | None:
    """The family a config.json's `model_type` names, if it is one of ours."""
    keymap = keymap_of_config(config)
    return FAMILIES[keymap.id] if keymap is not None else None


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UserError(f"unknown family {name!r}; vlhub knows {', '.join(FAMILIES)}") from None
