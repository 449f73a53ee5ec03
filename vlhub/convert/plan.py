"""A conversion plan: for every source tensor, its target name, shape, dtype and the ops between.

Built from headers and the key map alone, before any tensor data is read. Strict: a source tensor
that matches no rule, an official tensor the source lacks, two source tensors claiming one official
name, or a shape that disagrees with config.json stops the plan with every offending key listed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from vlhub.convert.layouts import UNKNOWN, detect_family, detect_layout
from vlhub.convert.ops import FLOAT_DTYPES, swapped_shape
from vlhub.errors import UserError
from vlhub.family_registry import FAMILIES
from vlhub.formats.tensors import TensorMeta
from vlhub.keymaps import ExpectedTensor, KeyMap, Layout, evaluate, load_keymap

_LISTED = 8  # keys named per category in an error line; the rest are counted


class KeyMapMismatch(UserError):
    """The key map and the checkpoint disagree; nothing has been written."""

    def __init__(self, keymap_id: str, problems: dict[str, list[str]], hint: str) -> None:
        self.problems = problems
        parts = []
        for kind, keys in problems.items():
            shown = ", ".join(keys[:_LISTED]) + (f" and {len(keys) - _LISTED} more" if len(keys) > _LISTED else "")
            parts.append(f"{len(keys)} {kind} ({shown})")
        super().__init__(f"key map {keymap_id} does not match the checkpoint: {'; '.join(parts)}{hint}")


@dataclass(frozen=True)
class Step:
    """One output tensor: where it comes from and what happens to it on the way. A tensor the source keeps in
    parts (one expert at a time) has them in `parts`, in order (expert by expert, each expert's parts in turn);
    `source` is then the official tensor they make, stored where the first part is."""

    source: TensorMeta
    target: TensorMeta
    ops: tuple[str, ...]
    parts: tuple[TensorMeta, ...] = ()

    @property
    def transpose(self) -> bool:
        return "transpose" in self.ops

    @property
    def copies_bytes(self) -> bool:
        """Whether the output bytes are the source bytes (a rename at most)."""
        return not self.parts and not self.transpose and self.source.dtype == self.target.dtype

    @property
    def first_stored(self) -> TensorMeta:
        """The first tensor it reads from the source (where it is in the files)."""
        return self.parts[0] if self.parts else self.source


@dataclass
class Plan:
    """Everything a conversion will do, known before it reads any tensor data."""

    family: str
    keymap: KeyMap
    source_layout: str
    target_layout: str
    dtype: str | None
    steps: list[Step]
    dropped: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(step.target.nbytes for step in self.steps)

    @property
    def op_counts(self) -> dict[str, int]:
        counts = Counter(op.split(":")[0] for step in self.steps for op in step.ops)
        if self.dropped:
            counts["drop"] = len(self.dropped)
        return dict(counts)


def checkpoint_family(tensors: dict[str, TensorMeta], config: dict | None) -> str:
    """The family of a checkpoint (its tensor metas and config.json), refusing one without a config or of no
    family vlhub knows."""
    names = list(tensors)
    if not config:
        raise UserError("no config.json beside the weights: vlhub reads the model's shape from it; "
                        "put the original config.json next to the checkpoint")
    family = detect_family(config, names)
    if family is None:
        raise UserError(f"cannot tell which model family this checkpoint is; keys seen: {', '.join(names[:6])}"
                        f"{' ...' if len(names) > 6 else ''} (vlhub converts "
                        f"{', '.join(f.display_name for f in FAMILIES.values())})")
    return family


def plan_conversion(
    tensors: dict[str, TensorMeta],
    config: dict | None,
    *,
    target_layout: str | tuple[str, ...],
    dtype: str | None = None,
    allow_unmatched: bool = False,
) -> Plan:
    """Plan converting a checkpoint (its tensor metas and config.json) to `target_layout` (or to the
    first of several that the family's key map declares).

    `dtype` casts every floating tensor; None keeps each tensor's dtype (bits unchanged).
    """
    names = list(tensors)
    family = checkpoint_family(tensors, config)
    assert config  # checkpoint_family refuses a checkpoint without one
    keymap = load_keymap(family)
    source_name = detect_layout(family, tensors, config)
    if source_name == UNKNOWN:
        raise UserError(f"the keys match no {family} layout vlhub knows ({', '.join(keymap.layouts)}); "
                        f"keys seen: {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}")
    candidates = (target_layout,) if isinstance(target_layout, str) else target_layout
    target = keymap.layout(next((name for name in candidates if name in keymap.layouts), candidates[-1]))
    if target.input_only:
        raise UserError(f"{target.name} is read but never written; write the official layout instead")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise UserError(f"cannot convert to dtype {dtype!r}; choose one of {', '.join(FLOAT_DTYPES)}")
    return _match(keymap, keymap.layouts[source_name], target, tensors, config, dtype, allow_unmatched)


def _joined_parts(layout: Layout, want: ExpectedTensor, parts: dict[tuple[int, int], TensorMeta],
                  problems: dict[str, list[str]]) -> tuple[TensorMeta, ...]:
    """The parts of one fused official tensor as the layout holds it joined, [entries, rows, columns] (the official
    shape, its last two axes swapped where the layout transposes its kind), in order, each [columns / parts, rows]
    (an [out, in] matrix whose transpose is its slice of the entry); what is missing, mis-shaped or of mixed
    dtypes goes into `problems`."""
    count = layout.part_count(want.name)
    entries, rows, columns = _stored_shape(layout, want)
    ordered = []
    for index in range(entries):
        for number in range(count):
            meta = parts.get((index, number))
            if meta is None:
                problems.setdefault("missing", []).append(f"{want.name} (expert {index}, part {number + 1} of {count})")
                continue
            if meta.shape != (columns // count, rows):
                problems["mis-shaped"].append(f"{meta.name} is {list(meta.shape)}, config.json says "
                                              f"{[columns // count, rows]}")
            ordered.append(meta)
    if len({meta.dtype for meta in ordered}) > 1:
        problems["mis-shaped"].append(f"the parts of {want.name} have different dtypes")
    return tuple(ordered)


def _stored_shape(layout: Layout, want: ExpectedTensor) -> tuple[int, ...]:
    return swapped_shape(want.shape) if layout.transposes(want.kind) else want.shape


def _match(keymap: KeyMap, source: Layout, target: Layout, tensors: dict[str, TensorMeta], config: dict,
           dtype: str | None, allow_unmatched: bool) -> Plan:
    dims = keymap.resolve_dims(config)
    expected = {t.name: t for t in keymap.expected(config)}
    claimed: dict[str, str] = {}
    problems: dict[str, list[str]] = {"unmatched": [], "ambiguous": [], "mis-shaped": [], "not float": []}
    dropped, passed_through = [], []
    in_parts: dict[str, dict[tuple[int, int], TensorMeta]] = {}
    for name, meta in tensors.items():
        part = source.part_of(name)
        if part is not None and part.official in expected:
            in_parts.setdefault(part.official, {})[(part.index, part.part)] = meta
            if meta.dtype not in FLOAT_DTYPES:
                problems["not float"].append(f"{name} is {meta.dtype}")
            continue
        official = source.to_official(name)
        if source.from_official(official) != name or official not in expected:
            condition = keymap.drop_condition(official)
            if condition and evaluate(condition, dims):
                dropped.append(name)
            elif allow_unmatched:
                passed_through.append(meta)
            else:
                problems["unmatched"].append(name)
            continue
        if official in claimed:
            problems["ambiguous"].append(f"{claimed[official]} and {name} are both {official}")
            continue
        claimed[official] = name
        want = expected[official]
        stored = _stored_shape(source, want)
        if meta.shape != stored:
            problems["mis-shaped"].append(f"{name} is {list(meta.shape)}, config.json says {list(stored)}")
        if meta.dtype not in FLOAT_DTYPES:  # every tensor these families hold is floating point
            problems["not float"].append(f"{name} is {meta.dtype}"
                                         + (" (how Paddle stores bfloat16: if it is, say dtype bfloat16 in "
                                            "config.json)" if meta.dtype == "uint16" else ""))
    joined = {official: _joined_parts(source, expected[official], parts, problems)
              for official, parts in in_parts.items()}
    problems["missing"] = problems.get("missing", []) + [name for name in expected
                                                          if name not in claimed and name not in joined]
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        hint = "; --allow-unmatched passes unmatched tensors through" if "unmatched" in problems else ""
        raise KeyMapMismatch(keymap.id, problems, hint)

    steps = []
    for official, want in expected.items():
        parts = joined.get(official, ())
        meta = (TensorMeta(official, parts[0].dtype, _stored_shape(source, want), parts[0].shard) if parts
                else tensors[claimed[official]])
        transpose = source.transposes(want.kind) != target.transposes(want.kind)
        target_meta = TensorMeta(
            target.from_official(official),
            dtype or meta.dtype,
            swapped_shape(meta.shape) if transpose else meta.shape,
        )
        ops = ["fuse"] if parts else []
        if target_meta.name != meta.name:
            ops.append("rename")
        if transpose:
            ops.append("transpose")
        if target_meta.dtype != meta.dtype:
            ops.append(f"cast:{meta.dtype}->{target_meta.dtype}")
        steps.append(Step(meta, target_meta, tuple(ops), parts))
    steps += [Step(meta, TensorMeta(meta.name, meta.dtype, meta.shape), ()) for meta in passed_through]
    return Plan(keymap.id, keymap, source.name, target.name, dtype, steps, dropped)
