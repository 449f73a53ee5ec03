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
from vlhub.keymaps.expr import evaluate, names_in
from vlhub.units import plural

__all__ = ["DIM_BOUNDS", "FAMILY_FILES", "DimBound", "ExpectedTensor", "KeyMap", "Layout", "PartOf", "TensorRule",
           "evaluate", "keymap_of_config", "load_keymap"]

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
MAX_EXPERTS = 4096  # routed experts per layer: 128 (Qwen3-VL MoE) to 512 (Qwen3.5-397B) in released models
MAX_POSITION_TABLE = 1 << 16  # a ViT's learned position table: 2304 rows (48 x 48) in Qwen3-VL
MAX_CONV_KERNEL = 64  # a linear-attention layer's short convolution: 4 in Qwen3.5


@dataclass(frozen=True)
class DimBound:
    """What a config.json number may be: a whole number from 1 to `most`, or if not `whole` any finite
    number above 0 and at most `most`."""

    most: int
    whole: bool = True
    least: int = 1

    def accepts(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.whole:
            return isinstance(value, int) and self.least <= value <= self.most
        return math.isfinite(value) and 0 < value <= self.most

    def describe(self) -> str:
        if not self.whole:
            return f"a number above 0 and at most {self.most}"
        return f"a whole number from {self.least} to {self.most}" if self.least != self.most else f"{self.most}"


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
    **dict.fromkeys(("head_dim",), DimBound(MAX_WIDTH)),
    "experts": DimBound(MAX_EXPERTS),
    "experts_per_token": DimBound(MAX_EXPERTS),
    "moe_inter": DimBound(MAX_FFN),
    "v_positions": DimBound(MAX_POSITION_TABLE),
    # list lengths (`length = true`): how many deepstack mergers a vision tower has, 3 in released models
    "deepstack": DimBound(MAX_LAYERS, least=0),
    # MoE checkpoints whose every decoder layer is sparse, as every release is: dense layers among sparse ones
    # (mlp_only_layers, decoder_sparse_step above 1) would need per-layer tensor rules
    "dense_layers": DimBound(0, least=0),
    "sparse_step": DimBound(1),
    # linear-attention (Gated DeltaNet) layers: key and value heads, their widths, the short convolution's kernel
    **dict.fromkeys(("lin_k_heads", "lin_v_heads"), DimBound(MAX_HEADS)),
    **dict.fromkeys(("lin_k_dim", "lin_v_dim"), DimBound(MAX_WIDTH)),
    "conv_kernel": DimBound(MAX_CONV_KERNEL),
    "full_interval": DimBound(MAX_LAYERS),
    "shared_inter": DimBound(MAX_FFN),
    # an RMSNorm's epsilon (1e-6 in released models)
    "eps": DimBound(1, whole=False),
    # the rotary: the share of a head it turns, and the multimodal sections' frequency slots (each up to a head)
    "rotary_fraction": DimBound(1, whole=False),
    "mrope_section": DimBound(MAX_WIDTH, least=0),
}


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
class PartOf:
    """Where one stored tensor of a layout that keeps a fused tensor in parts belongs: the official (fused)
    tensor, the index along its first axis (the expert) and which of that entry's parts it is."""

    official: str
    index: int
    part: int


@dataclass(frozen=True)
class Layout:
    """How a layout stores the official tensors: prefix renames, which kinds it transposes, and which fused
    tensors it keeps in parts (`unfused`: official template -> the templates of its parts, one set per entry of
    its first axis, `{expert}` numbering them; entry e of the official tensor is its parts' [out, in] matrices
    transposed and joined along their out axis)."""

    name: str
    description: str
    rename: tuple[tuple[str, str], ...] = ()
    transpose: frozenset[str] = frozenset()
    format: str | None = None
    input_only: bool = False
    unfused: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def part_of(self, name: str) -> PartOf | None:
        """The fused official tensor a stored part belongs to, if `name` is one of this layout's parts."""
        for official, parts in self.unfused:
            for number, template in enumerate(parts):
                found = _compile(template).fullmatch(name)
                if found is not None:
                    bound = found.groupdict()
                    return PartOf(_PLACEHOLDER.sub(lambda m: bound[m.group(1)], official),
                                  int(bound["expert"]), number)
        return None

    def part_count(self, official_name: str) -> int:
        """How many parts each entry of that official tensor has in this layout (0: it is stored whole)."""
        return next((len(parts) for official, parts in self.unfused if _compile(official).fullmatch(official_name)), 0)

    def keeps_in_parts(self, official_name: str) -> bool:
        """Whether this layout stores that official tensor as parts."""
        return self.part_count(official_name) > 0

    def from_official(self, name: str) -> str:
        """This layout's name for an official name (the longest matching official prefix wins)."""
        return _swap_prefix(name, self.rename)

    def to_official(self, name: str) -> str:
        """The official name for one of this layout's names."""
        return _swap_prefix(name, tuple((new, old) for old, new in self.rename))

    def transposes(self, kind: str) -> bool:
        return kind in self.transpose

    def stores_like(self, other: Layout) -> bool:
        """Whether both store every tensor under the same name and shape (two loaders' names for one form)."""
        return self.rename == other.rename and self.transpose == other.transpose


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
    # model_type -> architecture, the family's main model type first (a family may hold dense and MoE variants)
    model_types: dict[str, str] = field(default_factory=dict)
    # (divisor, dividend) dim pairs the architecture splits evenly, e.g. the heads of a width
    divides: tuple[tuple[str, str], ...] = ()
    # `[drop]` patterns every conversion names when it drops tensors they match, with what they are and why
    drop_why: dict[str, str] = field(default_factory=dict)
    # tensors the releases carry that every conversion drops (`[release_extras]`, literal names): the built-in tiny
    # models hold them too, so their conversions drop them as a release's do
    release_extras: tuple[TensorRule, ...] = ()
    digest: str = field(default="")

    def check_config(self, config: dict) -> dict[str, object]:
        """The dims config.json sets, each within its bound (`DIM_BOUNDS`) and each pair the architecture
        splits evenly (`divides`); anything else is one `UserError` line naming the field. Dims it leaves
        out are not looked for here."""
        given = {}
        for name, spec in self.dims.items():
            key, found = _config_lookup(config, spec)
            if found is not None and "indices_of" in spec:
                given[name] = self._indices(config, key, found, spec)
                continue
            if found is not None and "entries" in spec:
                given[name] = self._entries(name, key, found, spec["entries"])
                continue
            if found is not None and spec.get("length"):
                if not isinstance(found, list):
                    raise UserError(f"config.json {key} is {reprlib.repr(found)}; a {self.id} checkpoint needs a list")
                found = len(found)
            if found is not None and "equals" in spec:
                found = found == spec["equals"]
            if found is not None and "one_of" in spec:  # a word, not a number: one of the names the forwards know
                if found not in spec["one_of"]:
                    raise UserError(f"config.json {key} is {reprlib.repr(found)}; a {self.id} checkpoint needs one of "
                                    f"{', '.join(spec['one_of'])}")
                given[name] = found
                continue
            if found is not None:
                given[name] = self._checked(name, key, found)
        self._check_divides(given)
        return given

    def resolve_dims(self, config: dict) -> dict[str, object]:
        """Every dim and derived value for one config.json (flat official or transformers-5 nested)."""
        values = self.check_config(config)
        # defaults that name another dim are filled once every dim read from the config is known
        for name, spec in sorted(self.dims.items(), key=lambda item: bool({"default_from", "default_every"} &
                                                                              item[1].keys())):
            if name in values:
                continue
            if "default" in spec:
                values[name] = spec["default"]
            elif "default_from" in spec:
                values[name] = values[spec["default_from"]]
            elif "default_every" in spec:  # an `indices_of` list left out: every n-th of its `length_of` count
                every, count = values[spec["default_every"]], values[spec["length_of"]]
                values[name] = tuple(i for i in range(count) if (i + 1) % every == 0)  # type: ignore[operator]
            else:
                raise UserError(f"config.json has no {' or '.join(map(repr, _keys(spec)))}, which a {self.id} "
                                "checkpoint needs")
        self._check_divides(values)  # a default can complete a pair
        for name, expression in self.derived.items():
            values[name] = evaluate(expression, values)
        return values

    def resolve_flag(self, config: dict, name: str) -> bool:
        """One true-or-false dim of a config (its default when config.json leaves it out)."""
        key, found = _config_lookup(config, self.dims[name])
        return bool(self._checked(name, key, found) if found is not None else self.dims[name].get("default", False))

    def _indices(self, config: dict, key: str, found: object, spec: dict) -> tuple[int, ...]:
        """A dim read from a list of one word per layer (`indices_of`): the positions holding that word. The list
        must have one entry of `values` for each of the `length_of` dim's count."""
        _, count = _config_lookup(config, self.dims[spec["length_of"]])
        values = spec["values"]
        if not isinstance(found, list) or len(found) != count or any(entry not in values for entry in found):
            raise UserError(f"config.json {key} is {reprlib.repr(found)}; a {self.id} checkpoint needs a list of "
                            f"{plural(count, 'entry')}, each one of {', '.join(map(repr, values))}")
        return tuple(i for i, entry in enumerate(found) if entry == spec["indices_of"])

    def _entries(self, name: str, key: str, found: object, count: int) -> tuple[int, ...]:
        """A dim read from a list of `count` numbers (`entries`), each within the dim's bound."""
        bound = DIM_BOUNDS[name]
        if not isinstance(found, list) or len(found) != count or not all(map(bound.accepts, found)):
            raise UserError(f"config.json {key} is {reprlib.repr(found)}; a {self.id} checkpoint needs a list of "
                            f"{count} numbers, each {bound.describe()}")
        return tuple(found)

    def drop_condition(self, official: str) -> str | None:
        """The condition under which an official name is dropped (`[drop]`: a name, or a prefix ending in `.*`)."""
        if official in self.drop:
            return self.drop[official]
        return next((condition for pattern, condition in self.drop.items()
                     if pattern.endswith(".*") and official.startswith(pattern[:-1])), None)

    def drop_notes(self, dropped: list[str]) -> list[str]:
        """What a conversion says of the tensors it dropped (official names) that a `[drop_why]` pattern matches:
        `dropped 3 mtp.* tensors (the multi-token-prediction head: ...)`."""
        notes = []
        for pattern, why in self.drop_why.items():
            count = sum(name == pattern or (pattern.endswith(".*") and name.startswith(pattern[:-1]))
                        for name in dropped)
            if count:
                notes.append(f"dropped {plural(count, pattern + ' tensor')} ({why})")
        return notes

    def _checked(self, name: str, key: str, value: object) -> object:
        spec = self.dims[name]
        bound = None if _is_flag(spec) else DIM_BOUNDS[name]
        if isinstance(value, bool) if bound is None else bound.accepts(value):
            return value
        wanted = "true or false" if bound is None else bound.describe()
        if spec.get("length"):
            wanted = f"at most {plural(bound.most, 'entry')}" if bound is not None and bound.least == 0 else wanted
            raise UserError(f"config.json {key} has {plural(value, 'entry')}; a {self.id} checkpoint needs {wanted}"
                            + (f" ({spec['why']})" if "why" in spec else ""))
        raise UserError(f"config.json {key} is {reprlib.repr(value)}; a {self.id} checkpoint needs {wanted}"
                        + (f" ({spec['why']})" if "why" in spec else ""))

    def _check_divides(self, values: dict[str, object]) -> None:
        for divisor, dividend in self.divides:
            if divisor in values and dividend in values and values[dividend] % values[divisor]:  # type: ignore
                top, bottom = _keys(self.dims[dividend])[0], _keys(self.dims[divisor])[0]
                raise UserError(f"config.json {top} {values[dividend]} is not a multiple of {bottom} "
                                f"{values[divisor]}; a {self.id} checkpoint needs {top} divisible by {bottom}")

    def expected(self, config: dict) -> list[ExpectedTensor]:
        """Every tensor the official checkpoint holds for this config, in official order (layer by layer)."""
        dims = self.resolve_dims(config)
        # a condition naming a rule's placeholder (`layer in full_layers`) is decided index by index below
        per_index = {rule for rule in self.tensors if rule.when and set(rule.placeholders) & names_in(rule.when)}
        rules = [rule for rule in self.tensors if not rule.when or rule in per_index or evaluate(rule.when, dims)]
        out = []
        # consecutive rules over the same placeholders form one block, expanded index by index
        for placeholders, block in itertools.groupby(rules, key=lambda rule: tuple(rule.placeholders)):
            block_rules = list(block)
            ranges = [range(int(dims[self.counts[p]])) for p in placeholders]  # type: ignore[call-overload]
            for indices in itertools.product(*ranges):
                bound = dict(zip(placeholders, map(str, indices)))
                for rule in block_rules:
                    if rule in per_index and not evaluate(rule.when, {**dims, **dict(zip(placeholders, indices))}):
                        continue
                    name = _PLACEHOLDER.sub(lambda m: bound[m.group(1)], rule.template)
                    shape = tuple(int(evaluate(expr, dims)) for expr in rule.shape)  # type: ignore[call-overload]
                    out.append(ExpectedTensor(name, rule.kind, shape))
        return out

    def extras(self, config: dict) -> list[ExpectedTensor]:
        """The `[release_extras]` tensors for this config, their shapes from its dims."""
        dims = self.resolve_dims(config)
        return [ExpectedTensor(rule.template, rule.kind,
                               tuple(int(evaluate(expr, dims)) for expr in rule.shape))  # type: ignore[call-overload]
                for rule in self.release_extras]

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
    return isinstance(spec.get("default"), bool) or "equals" in spec


def _keys(spec: dict) -> list[str]:
    """The config.json keys a dim is read from: one, or alternatives tried in order (the official file's name
    first, then what transformers re-saves)."""
    key = spec["key"]
    return [key] if isinstance(key, str) else list(key)


def _config_lookup(config: dict, spec: dict) -> tuple[str, object]:
    """(the key found, its value) for a dim, or (its first key, None) when config.json has none of them."""
    for key in _keys(spec):
        found = config.get(key) if spec.get("top_level") else _config_value(config, key)
        if found is not None:
            return key, found
    return _keys(spec)[0], None


def _config_value(config: dict, key: str) -> object:
    """config[key], looking inside nested sections for dotted keys and in `text_config` for text keys (a dotted
    key's section too: `rope_parameters.mrope_section`)."""
    section, _, leaf = key.rpartition(".")
    text = config.get("text_config")
    if section:
        holder = config.get(section)
        if not isinstance(holder, dict) and isinstance(text, dict):
            holder = text.get(section)
        return holder.get(leaf) if isinstance(holder, dict) else None
    if key in config:
        return config[key]
    return text.get(key) if isinstance(text, dict) else None


def keymap_of_config(config: dict | None) -> KeyMap | None:
    """The key map of the family whose `model_type` config.json names, if vlhub has one."""
    model_type = (config or {}).get("model_type")
    return next((keymap for keymap in map(load_keymap, FAMILY_FILES) if model_type in keymap.model_types), None)


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        elif isinstance(value, list) and isinstance(merged.get(key), list):
            merged[key] = merged[key] + value
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
    unbounded = [name for name, spec in data.get("dims", {}).items()
                 if not _is_flag(spec) and not {"indices_of", "one_of"} & spec.keys() and name not in DIM_BOUNDS]
    if unbounded:
        raise ValueError(f"{family} key map: dims {unbounded} have no bound in DIM_BOUNDS")
    rules, extras = (tuple(
        TensorRule(template, spec["kind"], tuple(s.strip() for s in spec["shape"].split(",")), spec.get("when"))
        for template, spec in data.get(section, {}).items()
    ) for section in ("tensors", "release_extras"))
    layouts = {
        name: Layout(
            name=name,
            description=spec["description"],
            rename=tuple((old, new) for old, new in spec.get("rename", [])),
            transpose=frozenset(spec.get("transpose", [])),
            format=spec.get("format"),
            input_only=spec.get("input_only", False),
            unfused=tuple((official, tuple(parts)) for official, parts in spec.get("unfused", {}).items()),
        )
        for name, spec in data["layouts"].items()
    }
    model_types = {data["model_type"]: data["architecture"]}
    model_types.update({name: spec["architecture"] for name, spec in data.get("variants", {}).items()})
    keymap = KeyMap(
        id=data["id"], model_type=data["model_type"], architecture=data["architecture"], model_types=model_types,
        divides=tuple(tuple(pair) for pair in data.get("divides", [])),  # type: ignore[misc]
        checkpoint_format=data["checkpoint_format"], orientation_probe=data["orientation_probe"],
        dims=data.get("dims", {}), derived=data.get("derived", {}), counts=data.get("counts", {}),
        tensors=rules, drop=data.get("drop", {}), drop_why=data.get("drop_why", {}), layouts=layouts,
        release_extras=extras, digest=hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16],
    )
    undropped = [rule.template for rule in extras if keymap.drop_condition(rule.template) != "True"]
    if undropped:
        raise ValueError(f"{family} key map: release_extras {undropped} are not always dropped ([drop])")
    return keymap
