"""The three model families and the config.json helpers every part of vlhub shares.

What a family's checkpoint holds (names, kinds, shapes, layouts) is data in its key map
(`vlhub/keymaps/<family>.toml`); this module gives it a name and a few conveniences.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass
from functools import cached_property

from vlhub.errors import UserError
from vlhub.keymaps import FAMILY_FILES, KeyMap, load_keymap

Shape = tuple[int, ...]


def text_config(config: dict) -> dict:
    """Text hyper-parameters, from the official flat config or a transformers-5 nested one."""
    return {**config, **(config.get("text_config") or {})}


def tie_word_embeddings(config: dict) -> bool:
    """Whether lm_head shares the embedding (then the official file has no lm_head.weight)."""
    return bool(text_config(config).get("tie_word_embeddings", False))


@dataclass(frozen=True)
class Family:
    """A model family (`qwen_vl`, `qwen2_vl`, `qwen2_5_vl`), described by its key map."""

    name: str

    @cached_property
    def keymap(self) -> KeyMap:
        return load_keymap(self.name)

    @property
    def model_type(self) -> str:
        return self.keymap.model_type

    @property
    def architecture(self) -> str:
        return self.keymap.architecture

    @property
    def checkpoint_format(self) -> str:
        """The format the official upload uses (torch .bin for Qwen-VL, safetensors otherwise)."""
        return self.keymap.checkpoint_format

    def official_tensors(self, config: dict) -> list[tuple[str, Shape]]:
        """Every tensor of the official checkpoint for this config, in official order, with its shape."""
        return [(t.name, t.shape) for t in self.keymap.expected(config)]


FAMILIES: dict[str, Family] = {name: Family(name) for name in FAMILY_FILES}


def family_of_config(config: dict | None) -> Family | None:
    """The family a config.json's `model_type` names, if it is one of ours."""
    if not config:
        return None
    model_type = config.get("model_type", "")
    return next((f for f in FAMILIES.values() if f.model_type == model_type), None)


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UserError(f"unknown family {name!r}; vlhub knows {', '.join(FAMILIES)}") from None


def check_config(config: dict) -> None:
    """Refuse a config.json before anything loops or allocates on its numbers: it must name its
    model_type, and the dims it gives a family vlhub knows must be within bounds (`KeyMap.check_config`)."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        found = "has no model_type" if model_type is None else f"model_type is {reprlib.repr(model_type)}"
        raise UserError(f"config.json {found}; vlhub reads the model types "
                        f"{', '.join(f.model_type for f in FAMILIES.values())}")
    known = family_of_config(config)
    if known is not None:
        known.keymap.check_config(config)
