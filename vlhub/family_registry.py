"""The model families: one folder each, `vlhub/families/<family>/`, holding its key map (`keymap.toml`: every
official tensor, its shape and the layouts it is stored in), its facts (`family.toml`: what each deployment target
needs to know of it) and its code (the smoke input, the numpy reference and the Paddle network).

This module is the registry: a family is a folder that holds a key map, found by looking, so adding one never
edits a list. It imports no family's code; `Family.code` does, when asked.

`family.toml`, read through `Family`:

    display_name = "Qwen2-VL"          how messages name the family
    [vision]                           `Family.vision`: resize ("smart" or "fixed"), image_tokens (fixed: the key-map
                                       dim that is the tokens per image), video, window_attention, norm, mlp
    [config]                           `Family.config_facts`: what its config.json carries (precision_flags;
                                       nested: the official file keeps text_config and vision_config)
    [processor]                        the official preprocessor_config.json (the built-in tiny models write it)
    [paddle]                           `Family.paddle_facts`: what Paddle loaders read of its Paddle outputs
    [generation]                       the official generation_config.json (the built-in tiny models write it)
    [targets.<target>]                 `Family.route(target)`: what that target builds its layout from (each
                                       target's folder says which keys it reads); without the table the family
                                       has no route there, and `refused = "..."` is the one-line reason instead;
                                       `[targets.<target>.model_types.<type>] refused = "..."` refuses one of
                                       the family's model types (a MoE variant) only
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
FAMILIES_PACKAGE = "vlhub.families"  # where the family folders are (read as data here, imported by `Family.code`)


@dataclass(frozen=True)
class VisionFacts:
    """How a family's processor and vision tower treat images (`family.toml` `[vision]`)."""

    # "smart": smart_resize within [min_pixels, max_pixels] into 14-pixel patches, 2x2 merged into tokens;
    # "fixed": every image resized to the config's image size, a fixed number of tokens (`image_tokens`)
    resize: str = "smart"
    image_tokens: str | None = None  # fixed: the key-map dim that is the tokens per image
    video: bool = True
    window_attention: bool = False  # blocks outside the config's fullatt_block_indexes attend within windows
    norm: str | None = None  # the blocks' norm: "layer" or "rms"
    mlp: str | None = None  # the blocks' MLP: "quick_gelu" (fc1, fc2) or "gated" (gate, up, down with SiLU)


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
        path = resources.files(FAMILIES_PACKAGE) / self.name / "family.toml"
        return tomllib.loads(path.read_text()) if path.is_file() else {}

    @property
    def display_name(self) -> str:
        return self.facts.get("display_name", self.name)

    @cached_property
    def vision(self) -> VisionFacts:
        """The family-wide facts of its vision tower (`[vision]`)."""
        return VisionFacts(**self.facts.get("vision", {}))

    @property
    def config_facts(self) -> dict:
        """What config.json of this family carries beyond the official fields (`[config]`)."""
        return self.facts.get("config", {})

    @property
    def paddle_facts(self) -> dict:
        """What PaddleMIX / PaddleNLP read of this family's Paddle outputs (`[paddle]`)."""
        return self.facts.get("paddle", {})

    def target_facts(self, target: str, model_type: str | None = None) -> dict | None:
        """This family's `[targets.<target>]` table (the facts `target` needs, or a `refused` reason), or None when
        there is none; for one of its model types, that type's `[targets.<target>.model_types.<type>]` refusal
        where it has one. `route` is what targets ask."""
        facts = (self.facts.get("targets") or {}).get(target)
        own = ((facts or {}).get("model_types") or {}).get(model_type or "")
        return own if own is not None and "refused" in own else facts

    def routes_to(self, target: str, model_type: str | None = None) -> bool:
        """Whether the family (of that model type, if given) has a `[targets.<target>]` table that is not a
        refusal."""
        facts = self.target_facts(target, model_type)
        return facts is not None and "refused" not in facts

    def route(self, target: str, model_type: str | None = None) -> dict:
        """The facts `target` builds this family's layout (of that model type, if given) from; UserError (the
        table's own reason, else which families it takes) when the family has no route to it."""
        facts = self.target_facts(target, model_type)
        if facts is None or "refused" in facts:
            reason = (facts or {}).get("refused")
            takers = ", ".join(f.display_name for f in FAMILIES.values() if f.routes_to(target))
            raise UserError(reason or f"--to {target} supports {takers}, not {self.display_name}")
        return facts

    def code(self, module: str) -> ModuleType:
        """One module of the family's code (`inputs`, `reference`, `paddle`), imported on first use: the registry
        itself imports none, so `import vlhub` stays light and a family's numpy or Paddle code loads only when
        a forward of that family runs."""
        return importlib.import_module(f"{FAMILIES_PACKAGE}.{self.name}.{module}")

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
