"""The rules `vlhub keys` renames by, on key names alone: prefixes and regexes, first match wins, refusals, and the
renames between a family's layouts (renaming checkpoints: tests/cli/test_keys.py)."""

from __future__ import annotations

import itertools

import pytest

from vlhub.catalog import get_model
from vlhub.errors import UserError
from vlhub.keymaps import load_keymap
from vlhub.keys import layout_renames, parse_rename, plan_renames


def test_prefix_rules_apply_first_match_wins_in_the_order_given() -> None:
    keys = ["transformer.llm.h.0.ln_1.weight", "transformer.wte.weight", "transformer.visual.conv1.weight", "lm_head.w"]
    mapping = plan_renames(keys, [("transformer.llm.", "qwen."), ("transformer.visual.", "visual."),
                                  ("transformer.", "qwen.")])
    assert mapping == {"transformer.llm.h.0.ln_1.weight": "qwen.h.0.ln_1.weight",
                       "transformer.wte.weight": "qwen.wte.weight",
                       "transformer.visual.conv1.weight": "visual.conv1.weight", "lm_head.w": "lm_head.w"}
    with pytest.raises(UserError, match="transformer.llm.=qwen. renames nothing: every key it matches is taken"):
        plan_renames(keys, [("transformer.", "qwen."), ("transformer.llm.", "qwen.")])


def test_regex_replaces_the_first_match_only() -> None:
    keys = ["transformer.visual.transformer.resblocks.0.w", "model.layers.12.mlp.w", "model.norm.weight"]
    mapping = plan_renames(keys, [(r"transformer\.", "qwen."), (r"^model\.layers\.(\d+)\.", r"llm.h.\1.")],
                           regex=True)
    assert mapping == {"transformer.visual.transformer.resblocks.0.w": "qwen.visual.transformer.resblocks.0.w",
                       "model.layers.12.mlp.w": "llm.h.12.mlp.w", "model.norm.weight": "model.norm.weight"}


def test_parse_rename_splits_at_the_last_equals_sign() -> None:
    assert parse_rename("transformer=qwen") == ("transformer", "qwen")
    assert parse_rename(r"(?<=h\.)0=zero") == (r"(?<=h\.)0", "zero")
    assert parse_rename("model.=") == ("model.", "")
    with pytest.raises(UserError, match="expected OLD=NEW"):
        parse_rename("transformer")


@pytest.mark.parametrize(
    ("renames", "regex", "message"),
    [
        ([("a.", "c."), ("b.", "c.")], False, r"rename collision: 'a\.x', 'b\.x' would both be named 'c\.x'"),
        ([("a.", "qwen.")], False, r"'a\.x', 'qwen\.x' \(not renamed\) would both be named 'qwen\.x'"),
        ([("transfomer.", "qwen.")], False, r"--rename transfomer\.=qwen\. matches no key \(keys start with a\., "),
        ([("(unclosed", "x")], True, r"bad regex"),
        ([(r"^a\.", r"\2")], True, r"bad replacement"),
        ([], False, r"at least one --rename"),
    ],
)
def test_refused_renames(renames: list[tuple[str, str]], regex: bool, message: str) -> None:
    with pytest.raises(UserError, match=message):
        plan_renames(["a.x", "b.x", "qwen.x"], renames, regex=regex)


@pytest.mark.parametrize("model", ["tiny-qwen-vl", "tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_layout_renames_take_each_layout_to_every_one_a_rename_reaches(model: str) -> None:
    spec = get_model(model)
    keymap = load_keymap(spec.family.name)
    officials = [tensor.name for tensor in keymap.expected(spec.config)]
    for source, target in itertools.permutations(keymap.layouts.values(), 2):
        if source.transpose != target.transpose:
            continue  # a rename cannot transpose
        names = {source.from_official(name): target.from_official(name) for name in officials}
        assert plan_renames(names, layout_renames(source, target)) == names, (source.name, target.name)


# The README's `vlhub keys` recipe, exactly as written there (run from the directory it writes into).
