"""What a config.json says, read the same way everywhere: its text fields (flat or transformers-5 nested), whether
it ties its embeddings, and whether its numbers may be used at all (`check_config`, before anything loops or
allocates on them)."""

from __future__ import annotations

import reprlib

from vlhub.errors import UserError
from vlhub.keymaps import FAMILY_FILES, keymap_of_config, load_keymap


def text_config(config: dict) -> dict:
    """Text hyper-parameters, from the official flat config or a transformers-5 nested one."""
    return {**config, **(config.get("text_config") or {})}


def tie_word_embeddings(config: dict) -> bool:
    """Whether lm_head shares the embedding (then the official file has no lm_head.weight): as the family's key
    map reads the flag (transformers 5 ties a nested Qwen3-VL config by its top-level flag alone)."""
    keymap = keymap_of_config(config)
    if keymap is not None and "tied" in keymap.dims:
        return bool(keymap.resolve_flag(config, "tied"))
    return bool(text_config(config).get("tie_word_embeddings", False))


def check_config(config: dict) -> None:
    """Refuse a config.json before anything loops or allocates on its numbers: it must name its
    model_type, and the dims it gives a family vlhub knows must be within bounds (`KeyMap.check_config`)."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        found = "has no model_type" if model_type is None else f"model_type is {reprlib.repr(model_type)}"
        known = ", ".join(load_keymap(name).model_type for name in FAMILY_FILES)
        raise UserError(f"config.json {found}; vlhub reads the model types {known}")
    keymap = keymap_of_config(config)
    if keymap is not None:
        keymap.check_config(config)
