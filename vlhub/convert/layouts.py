"""Recognise a checkpoint's family and key layout from its names, shapes and config.json.

Every layout is declared in the family's key map (`vlhub/families/<family>/keymap.toml`); a layout matches the
names it would produce. Layouts that share names (official Qwen2-VL and PaddleMIX; official Qwen3-VL MoE and its
transformers-5 re-save) differ only in which kinds they store transposed: the shapes config.json gives settle it,
and where they cannot (square weights), one declared probe tensor's shape does.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from vlhub.convert.ops import swapped_shape
from vlhub.errors import UserError
from vlhub.formats.tensors import TensorMeta
from vlhub.keymaps import FAMILY_FILES, KeyMap, Layout, evaluate, keymap_of_config, load_keymap

UNKNOWN = "unknown"


def describe_layout(family: str | None, layout: str) -> str:
    """A layout's description as its family's key map gives it."""
    if family is None or layout == UNKNOWN:
        return "not a layout vlhub recognises"
    return load_keymap(family).layouts[layout].description


def explains(keymap: KeyMap, layout: Layout, name: str) -> bool:
    """Whether `name` is this layout's spelling of an official tensor (or of one part of one)."""
    part = layout.part_of(name)
    if part is not None:
        return keymap.rule_for(part.official) is not None
    official = layout.to_official(name)
    return (layout.from_official(official) == name and keymap.rule_for(official) is not None
            and not layout.keeps_in_parts(official))


def match_count(keymap: KeyMap, layout: Layout, names: list[str]) -> int:
    """How many names are this layout's spelling of an official tensor."""
    return sum(explains(keymap, layout, name) for name in names)


def detect_family(config: dict | None, names: list[str]) -> str | None:
    """The family config.json names, or else the one whose layouts explain most key names."""
    named = keymap_of_config(config)
    if named is not None:
        return named.id
    best, best_count = None, 0
    for keymap in map(load_keymap, FAMILY_FILES):
        count = max(match_count(keymap, layout, names) for layout in keymap.layouts.values())
        if count > best_count:
            best, best_count = keymap.id, count
    return best


def linear_orientation(keymap: KeyMap, layout: Layout, tensors: dict[str, TensorMeta],
                       config: dict | None) -> str | None:
    """"out_in" (torch) or "in_out" (Paddle), from the family's declared probe tensor, if present."""
    official = re.sub(r"\{\w+\}", "0", keymap.orientation_probe)  # the first layer's or block's
    probe = tensors.get(layout.from_official(official))
    rule = keymap.rule_for(official)
    if probe is None or rule is None or len(probe.shape) != 2:
        return None
    if config:
        expected = tuple(int(evaluate(e, keymap.resolve_dims(config))) for e in rule.shape)  # type: ignore
        if expected[0] != expected[1] and probe.shape in (expected, expected[::-1]):
            return "out_in" if probe.shape == expected else "in_out"
    # no config, or one the shapes contradict (the plan then reports the mismatch): the probe is a fused
    # q/k/v projection, three times wider out than in
    return "out_in" if probe.shape[0] > probe.shape[1] else "in_out"


def detect_layout(family: str | None, tensors: dict[str, TensorMeta], config: dict | None) -> str:
    """The name of the declared layout the checkpoint is in, or "unknown"."""
    if family is None:
        return UNKNOWN
    keymap = load_keymap(family)
    names = list(tensors)
    counts = {name: match_count(keymap, layout, names) for name, layout in keymap.layouts.items()}
    best = max(counts.values())
    if best == 0:
        return UNKNOWN
    tied = [keymap.layouts[name] for name, count in counts.items() if count == best]
    if len(tied) > 1 and config:
        tied = _best_shaped(keymap, tied, tensors, config)
    if len(tied) == 1:
        return tied[0].name
    orientation = linear_orientation(keymap, tied[0], tensors, config)
    if orientation is None:
        return UNKNOWN
    stored_transposed = orientation == "in_out"
    return next((layout.name for layout in tied if layout.transposes("linear") == stored_transposed), UNKNOWN)


def _best_shaped(keymap: KeyMap, layouts: list[Layout], tensors: dict[str, TensorMeta], config: dict) -> list[Layout]:
    """The layouts under which most tensors have the shape config.json gives them (all of them when the config's
    dims are unusable: the plan reports that)."""
    try:
        expected = {t.name: t for t in keymap.expected(config)}
    except UserError:
        return layouts

    def agreeing(layout: Layout) -> int:
        count = 0
        for name, meta in tensors.items():
            want = expected.get(layout.to_official(name))
            if want is not None and len(want.shape) >= 2:
                count += meta.shape == (swapped_shape(want.shape) if layout.transposes(want.kind) else want.shape)
        return count

    scores = {layout.name: agreeing(layout) for layout in layouts}
    top = max(scores.values())
    return [layout for layout in layouts if scores[layout.name] == top]


def spellings(family: str | None, layout: str, officials: Callable[[KeyMap], list[str]]) -> list[str]:
    """Every layout's spelling of some official names, the given layout's first (all families' when
    the family is unknown)."""
    names: list[str] = []
    for name in [family] if family else FAMILY_FILES:
        keymap = load_keymap(name)
        layouts = sorted(keymap.layouts.values(), key=lambda candidate: candidate.name != layout)
        names += [candidate.from_official(official) for official in officials(keymap) for candidate in layouts]
    return list(dict.fromkeys(names))


def embedding_candidates(family: str | None, layout: str) -> list[str]:
    """Every name the family's key map gives its embedding, the detected layout's first (all families'
    when the family is unknown)."""
    return spellings(family, layout, lambda keymap: [r.template for r in keymap.tensors if r.kind == "embedding"])
