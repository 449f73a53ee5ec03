"""Key maps: one data file per family naming every official tensor, its kind and shape, and the
layouts it is stored in (renames and transposes). One map drives both directions of a conversion.

A family's key map is `vlhub/families/<family>/keymap.toml`; the families are the folders that hold one. It
may `include` fragments shared by several families (`vlhub/keymaps/fragments/<name>.toml`); their sections
are merged, the including file's tensors first. Placeholders such as `{layer}` range over a count
read from config.json. Every dim read from config.json has a bound here (`DIM_BOUNDS`), checked before
anything loops or allocates on it.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
import reprlib
import sys
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

from vlhub.errors import UserError
from vlhub.keymaps.expr import evaluate

__all__ = ["DIM_BOUNDS", "FAMILY_FILES", "DimBound", "ExpectedTensor", "KeyMap", "Layout", "TensorRule", "evaluate",
           "keymap_of_config", "load_keymap"]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# every family is a folder of vlhub/families holding its key map (read as data: this layer imports no family)
_FAMILIES_ROOT = resources.files("vlhub") / "families"
FAMILY_FILES = tuple(sorted(entry.name for entry in _FAMILIES_ROOT.iterdir() if (entry / "keymap.toml").is_file()))
_PLACEHOLDER = re.compile(r"\{(\w+)\}")

# Upper bounds of the numbers a key map reads from config.json, so that a hostile one (num_hidden_layers:
# 1000000 would expand into 12 million tensor names) is refused before any work. Each is far above every
# released model, dense or mixture-of-experts: the largest have about 130 layers (Llama 3.1 405B: 126),
# width 18432 and FFN 73728 (PaLM 540B), 128 attention heads, vision towers of 48 blocks and vocabularies
# of about 260k tokens (Gemma 3). Qwen2.5-VL-72B, this project's largest, has 80 layers, width 8192, FFN
# 29568, 64 heads and 152064 tokens.
MAX_LAYERS = 1024  # decoder layers and vision blocks
MAX_WIDTH = 1 << 16  # hidden sizes, text and vision
MAX_FFN = 1 << 20  # MLP intermediate sizes
MAX_HEADS = 1024  # attention and key/value heads
MAX_VOCAB = 1 << 22
MAX_MLP_RATIO = 64  # a ViT's MLP width over its width: 4 to 5.3 in released models
MAX_CHANNELS = 64  # input image channels: 3
MAX_PATCH = 1024  # patch side, temporal patch and merge size: 14, 2 and 2 in released models
MAX_POSITIONS = 1 << 24  # max_position_embeddings (and Qwen-VL's seq_length): 32768 to 262144 in released models


@dataclass(frozen=True)
class DimBound:
    """What a config.json number may be: a whole number from 1 to `most`, or if not `whole` any finite
    number above 0 and at most `most`."""

    most: int
    whole: bool = True

    def accepts(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.whole:
            return isinstance(value, int) and 1 <= value <= self.most
        return math.isfinite(value) and 0 < value <= self.most

    def describe(self) -> str:
        return f"a whole number from 1 to {self.most}" if self.whole else f"a number above 0 and at most {self.most}"


# every dim of every key map, by name; flags (dims whose default is true or false) need none
DIM_BOUNDS: dict[str, DimBound] = {
    **dict.fromkeys(("layers", "v_depth", "v_layers"), DimBound(MAX_LAYERS)),
    **dict.fromkeys(("hidden", "v_width", "v_out", "out"), DimBound(MAX_WIDTH)),
    **dict.fromkeys(("inter", "v_inter"), DimBound(MAX_FFN)),
    **dict.fromkeys(("heads", "kv_heads", "v_heads"), DimBound(MAX_HEADS)),
    "vocab": DimBound(MAX_VOCAB),
    **dict.fromkeys(("positions", "seq_length"), DimBound(MAX_POSITIONS)),
    "v_mlp_ratio": DimBound(MAX_MLP_RATIO, whole=False),
    "v_in_chans": DimBound(MAX_CHANNELS),
    **dict.fromkeys(("v_patch", "v_temporal", "v_merge"), DimBound(MAX_PATCH)),
}
# (divisor, dividend): transformers' Qwen2-VL attention refuses a hidden size its heads do not divide, each
# key/value head serves a whole group of query heads, and the vision heads split the vision width
_DIVIDES = (("heads", "hidden"), ("kv_heads", "heads"), ("v_heads", "v_width"))


@dataclass(frozen=True)
class TensorRule:
    """One official tensor (or one per layer, with a placeholder): its kind, shape and condition."""

    template: str
    kind: str
    shape: tuple[str, ...]
    when: str | None = None

    @property
    def pattern(self) -> re.Pattern[str]:
        return _compile(self.template)

    @property
    def placeholders(self) -> list[str]:
        return _PLACEHOLDER.findall(self.template)


@dataclass(frozen=True)
class ExpectedTensor:
    """A concrete official tensor for one config."""

    name: str
    kind: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Layout:
    """How a layout stores the official tensors: prefix renames and which kinds it transposes."""

    name: str
    description: str
    rename: tuple[tuple[str, str], ...] = ()
    transpose: frozenset[str] = frozenset()
    format: str | None = None
    input_only: bool = False

    def from_official(self, name: str) -> str:
        """This layout's name for an official name (the longest matching official prefix wins)."""
        return _swap_prefix(name, self.rename)

    def to_official(self, name: str) -> str:
        """The official name for one of this layout's names."""
        return _swap_prefix(name, tuple((new, old) for old, new in self.rename))

    def transposes(self, kind: str) -> bool:
        return kind in self.transpose


def _swap_prefix(name: str, pairs: tuple[tuple[str, str], ...]) -> str:
    best = max((pair for pair in pairs if name.startswith(pair[0])), key=lambda p: len(p[0]), default=None)
    return name if best is None else best[1] + name[len(best[0]):]


@cache
def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{\w+\})", template)
    return re.compile("".join(
        f"(?P<{p[1:-1]}>0|[1-9][0-9]*)" if _PLACEHOLDER.fullmatch(p) else re.escape(p) for p in parts
    ))


@dataclass(frozen=True)
class KeyMap:
    """A family's key map, loaded from its TOML file and fragments."""

    id: str
    model_type: str
    architecture: str
    checkpoint_format: str
    orientation_probe: str
    dims: dict[str, dict]
    derived: dict[str, str]
    counts: dict[str, str]
    tensors: tuple[TensorRule, ...]
    drop: dict[str, str]
    layouts: dict[str, Layout]
    digest: str = field(default="")

    def check_config(self, config: dict) -> dict[str, object]:
        """The dims config.json sets, each within its bound (`DIM_BOUNDS`) and each pair the architecture
        splits evenly (`_DIVIDES`); anything else is one `UserError` line naming the field. Dims it leaves
        out are not looked for here."""
        given = {}
        for name, spec in self.dims.items():
            found = _config_value(config, spec["key"])
            if found is not None:
                given[name] = self._checked(name, found)
        self._check_divides(given)
        return given

    def resolve_dims(self, config: dict) -> dict[str, object]:
        """Every dim and derived value for one config.json (flat official or transformers-5 nested)."""
        values = self.check_config(config)
        # defaults that name another dim are filled once every dim read from the config is known
        for name, spec in sorted(self.dims.items(), key=lambda item: "default_from" in item[1]):
            if name in values:
                continue
            if "default" in spec:
                values[name] = spec["default"]
            elif "default_from" in spec:
                values[name] = values[spec["default_from"]]
            else:
                raise UserError(f"config.json has no {spec['key']!r}, which a {self.id} checkpoint needs")
        self._check_divides(values)  # a default can complete a pair
        for name, expression in self.derived.items():
            values[name] = evaluate(expression, values)
        return values

    def _checked(self, name: str, value: object) -> object:
        spec = self.dims[name]
        bound = None if _is_flag(spec) else DIM_BOUNDS[name]
        if isinstance(value, bool) if bound is None else bound.accepts(value):
            return value
        wanted = "true or false" if bound is None else bound.describe()
        raise UserError(f"config.json {spec['key']} is {reprlib.repr(value)}; a {self.id} checkpoint needs {wanted}")

    def _check_divides(self, values: dict[str, object]) -> None:
        for divisor, dividend in _DIVIDES:
            if divisor in values and dividend in values and values[dividend] % values[divisor]:  # type: ignore
                top, bottom = self.dims[dividend]["key"], self.dims[divisor]["key"]
                raise UserError(f"config.json {top} {values[dividend]} is not a multiple of {bottom} "
                                f"{values[divisor]}; a {self.id} checkpoint needs {top} divisible by {bottom}")

    def expected(self, config: dict) -> list[ExpectedTensor]:
        """Every tensor the official checkpoint holds for this config, in official order (layer by layer)."""
        dims = self.resolve_dims(config)
        rules = [rule for rule in self.tensors if not rule.when or evaluate(rule.when, dims)]
        out = []
        # consecutive rules over the same placeholders form one block, expanded index by index
        for placeholders, block in itertools.groupby(rules, key=lambda rule: tuple(rule.placeholders)):
            block_rules = list(block)
            ranges = [range(int(dims[self.counts[p]])) for p in placeholders]  # type: ignore[call-overload]
            for indices in itertools.product(*ranges):
                bound = dict(zip(placeholders, map(str, indices)))
                for rule in block_rules:
                    name = _PLACEHOLDER.sub(lambda m: bound[m.group(1)], rule.template)
                    shape = tuple(int(evaluate(expr, dims)) for expr in rule.shape)  # type: ignore[call-overload]
                    out.append(ExpectedTensor(name, rule.kind, shape))
        return out

    def rule_for(self, official_name: str) -> TensorRule | None:
        """The rule an official name matches, if any."""
        for rule in self.tensors:
            if rule.pattern.fullmatch(official_name):
                return rule
        return None

    def layout(self, name: str) -> Layout:
        try:
            return self.layouts[name]
        except KeyError:
            raise UserError(f"{self.id} has no layout {name!r}; it has {', '.join(self.layouts)}") from None


def _is_flag(spec: dict) -> bool:
    return isinstance(spec.get("default"), bool)


def _config_value(config: dict, key: str) -> object:
    """config[key], looking inside nested sections for dotted keys and in `text_config` for text keys."""
    section, _, leaf = key.rpartition(".")
    if section:
        holder = config.get(section)
        return holder.get(leaf) if isinstance(holder, dict) else None
    if key in config:
        return config[key]
    text = config.get("text_config")
    return text.get(key) if isinstance(text, dict) else None


def keymap_of_config(config: dict | None) -> KeyMap | None:
    """The key map of the family whose `model_type` config.json names, if vlhub has one."""
    model_type = (config or {}).get("model_type")
    return next((keymap for keymap in map(load_keymap, FAMILY_FILES) if keymap.model_type == model_type), None)


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged.setdefault(key, value)
    return merged


@cache
def load_keymap(family: str) -> KeyMap:
    """The key map of a family (one of `FAMILY_FILES`)."""
    if family not in FAMILY_FILES:
        raise UserError(f"no key map for family {family!r}; vlhub has {', '.join(FAMILY_FILES)}")
    texts = [(_FAMILIES_ROOT / family / "keymap.toml").read_text()]
    data = tomllib.loads(texts[0])
    for fragment in data.get("include", []):
        texts.append((resources.files(__package__) / "fragments" / f"{fragment}.toml").read_text())
        data = _merge(data, tomllib.loads(texts[-1]))
    unbounded = [name for name, spec in data.get("dims", {}).items() if not _is_flag(spec) and name not in DIM_BOUNDS]
    if unbounded:
        raise ValueError(f"{family} key map: dims {unbounded} have no bound in DIM_BOUNDS")
    rules = tuple(
        TensorRule(template, spec["kind"], tuple(s.strip() for s in spec["shape"].split(",")), spec.get("when"))
        for template, spec in data["tensors"].items()
    )
    layouts = {
        name: Layout(
            name=name,
            description=spec["description"],
            rename=tuple((old, new) for old, new in spec.get("rename", [])),
            transpose=frozenset(spec.get("transpose", [])),
            format=spec.get("format"),
            input_only=spec.get("input_only", False),
        )
        for name, spec in data["layouts"].items()
    }
    return KeyMap(
        id=data["id"], model_type=data["model_type"], architecture=data["architecture"],
        checkpoint_format=data["checkpoint_format"], orientation_probe=data["orientation_probe"],
        dims=data.get("dims", {}), derived=data.get("derived", {}), counts=data.get("counts", {}),
        tensors=rules, drop=data.get("drop", {}), layouts=layouts,
        digest=hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16],
    )
