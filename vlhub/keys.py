"""`vlhub keys`: rename tensor keys in a safetensors or pdparams checkpoint; tensor bytes are copied, never decoded.

    rename_keys(Path("qwen-vl-7b"), [("transformer.", "qwen.")], in_place=True)

Each rename is a prefix (a key starting with OLD gets NEW instead of that prefix) or, with
`regex=True`, `re.sub(OLD, NEW, key, count=1)`. A key takes the first rename that matches it, in the
order given. safetensors shards get a new header and their data section copied verbatim in the kernel
(`copy_file_range`, as `cp` does); pdparams shards are rewritten as a new pickle whose payloads are
copied from the old file in 16 MiB pieces. Shard names stay; the index's weight_map is rewritten.

A rename whose result is in no layout of the family's key map (`vlhub/keymaps/*.toml`) is refused,
naming the renames that would give one, unless `allow_unknown_layout=True`: no loader reads such keys.
A vlhub manifest beside the weights is kept true: new sha256 and sizes, the new key layout.
"""

from __future__ import annotations

import os
import re
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

from vlhub.atomic import disk_full, ensure_free_space, refuse_output_holding, replacing
from vlhub.convert.layouts import UNKNOWN, detect_family, detect_layout, explains, match_count
from vlhub.errors import CorruptCheckpoint, UserError
from vlhub.faults import commit_point
from vlhub.formats.io_utils import StoredBytes, copy_stored_bytes, read_json_file
from vlhub.formats.readers import MAX_INDEX_BYTES, Checkpoint, open_checkpoint
from vlhub.formats.safetensors_io import SafetensorsFile, SafetensorsShardWriter
from vlhub.formats.tensors import TensorMeta
from vlhub.formats.writers import write_json_atomic
from vlhub.keymaps import KeyMap, Layout, load_keymap
from vlhub.manifest import MANIFEST, FileEntry, Manifest
from vlhub.owned import is_disk_full, is_owned_name, temporary_name, writing

SUPPORTED_FORMATS = ("safetensors", "pdparams")

OnBytes = Callable[[int], None]
# called with the total bytes to copy; the context yields the function to call as bytes are written
ProgressFactory = Callable[[int], AbstractContextManager[OnBytes]]


@dataclass(frozen=True)
class _Rule:
    old: str
    new: str
    pattern: re.Pattern[str] | None

    @classmethod
    def make(cls, old: str, new: str, regex: bool) -> _Rule:
        if not regex:
            return cls(old, new, None)
        try:
            return cls(old, new, re.compile(old))
        except re.error as exc:
            raise UserError(f"--rename {old}={new}: bad regex ({exc})") from None

    def apply(self, key: str) -> str | None:
        """The new name, or None when the rule does not match `key`."""
        if self.pattern is None:
            return self.new + key[len(self.old):] if key.startswith(self.old) else None
        try:
            renamed, count = self.pattern.subn(self.new, key, count=1)
        except re.error as exc:
            raise UserError(f"--rename {self.old}={self.new}: bad replacement ({exc})") from None
        return renamed if count else None


@dataclass
class RenameResult:
    """What a rename did (or, for a dry run, would do)."""

    source: Path
    destination: Path | None  # the output path, SRC itself for --in-place, None for a dry run without either
    dry_run: bool
    renamed: list[tuple[str, str]]
    unchanged: int
    family: str | None  # None: not a checkpoint of a family vlhub knows
    layout: str  # the renamed keys' layout in the family's key map, or "unknown"
    written: list[Path] = field(default_factory=list)  # weight files, index and manifest, rewritten
    copied: list[Path] = field(default_factory=list)  # SRC's other files carried into a directory --out

    def to_json(self) -> dict:
        return {
            "source": str(self.source),
            "destination": str(self.destination) if self.destination else None,
            "dry_run": self.dry_run,
            "renamed": [[old, new] for old, new in self.renamed],
            "unchanged": self.unchanged,
            "family": self.family,
            "layout": self.layout,
            "written": [str(p) for p in self.written],
            "copied": [str(p) for p in self.copied],
        }


def parse_rename(text: str) -> tuple[str, str]:
    """Split `OLD=NEW` at the last `=` (a regex may hold `=` in a lookaround; tensor names never do)."""
    old, sep, new = text.rpartition("=")
    if not sep:
        raise UserError(f"--rename {text!r}: expected OLD=NEW, e.g. --rename transformer.=qwen.")
    return old, new


def plan_renames(keys: Iterable[str], renames: Sequence[tuple[str, str]], *, regex: bool = False) -> dict[str, str]:
    """Old name -> new name for every key (unmatched keys map to themselves).

    Raises `UserError` when a rename changes nothing (a typo, or every key it matches was taken by an
    earlier rename) or when two keys would end up with one name.
    """
    if not renames:
        raise UserError("give at least one --rename OLD=NEW, e.g. --rename transformer.=qwen.")
    rules = [_Rule.make(old, new, regex) for old, new in renames]
    mapping: dict[str, str] = {}
    applied: set[int] = set()
    matched: set[int] = set()
    for key in keys:
        hits = [(i, new) for i, rule in enumerate(rules) if (new := rule.apply(key)) is not None]
        matched.update(i for i, _ in hits)
        if hits:
            applied.add(hits[0][0])
        mapping[key] = hits[0][1] if hits else key
    for i, rule in enumerate(rules):
        if i in applied:
            continue
        if i in matched:
            raise UserError(f"--rename {rule.old}={rule.new} renames nothing: "
                            "every key it matches is taken by an earlier --rename")
        roots = sorted({key.split(".", 1)[0] + "." for key in mapping})
        shown = ", ".join(roots[:8]) + (", ..." if len(roots) > 8 else "")
        raise UserError(f"--rename {rule.old}={rule.new} matches no key (keys start with {shown})")
    _check_collisions(mapping)
    return mapping


def renamed_layout(
    checkpoint: Checkpoint,
    mapping: dict[str, str],
    renames: Sequence[tuple[str, str]],
    *,
    regex: bool = False,
    allow_unknown: bool = False,
) -> tuple[str | None, str]:
    """The family and the key-map layout the renamed keys are in ("unknown" only with `allow_unknown`).

    From a known layout the result must be one that stores the weights as the source's does (a rename cannot
    transpose) and explains every key the source's layout did; otherwise `UserError` names the renames that would.
    """
    family = detect_family(checkpoint.config, list(checkpoint.tensors))
    if family is None:
        return None, UNKNOWN  # not a family vlhub knows: no layout to hold the result to
    keymap = load_keymap(family)
    source = _layout(keymap, checkpoint.tensors, checkpoint.config)
    new_names = list(mapping.values())
    if source is None:
        renamed = {new: replace(checkpoint.tensors[old], name=new) for old, new in mapping.items()}
        result = _layout(keymap, renamed, checkpoint.config)
    else:
        needed = match_count(keymap, source, list(mapping))
        result = next((layout for layout in _reachable(keymap, source)
                       if match_count(keymap, layout, new_names) >= needed), None)
    if result is not None:
        return family, result.name
    if allow_unknown:
        return family, UNKNOWN
    given = " ".join(f"--rename {old}={new}" for old, new in renames) + (" --regex" if regex else "")
    if source is None:
        hint = (f"the source's keys match none of {', '.join(keymap.layouts)} either, so vlhub cannot say which "
                "rename would give one")
    else:
        hint = _nearest_layout_hint(keymap, source, mapping, regex)
    raise UserError(f"{given} would leave the keys in no {family} layout ({hint}); "
                    "pass --allow-unknown-layout to write them anyway")


def _layout(keymap: KeyMap, tensors: dict[str, TensorMeta], config: dict | None) -> Layout | None:
    name = detect_layout(keymap.id, tensors, config)
    return None if name == UNKNOWN else keymap.layouts[name]


def _reachable(keymap: KeyMap, source: Layout) -> list[Layout]:
    """The layouts a rename of `source`'s keys can give: those storing the weights as `source` does (a rename
    keeps each tensor's orientation), `source` itself first."""
    return sorted((layout for layout in keymap.layouts.values() if layout.transpose == source.transpose),
                  key=lambda layout: layout is not source)


def _nearest_layout_hint(keymap: KeyMap, source: Layout, mapping: dict[str, str], regex: bool) -> str:
    """A renamed key that is wrong, and the renames that give the layout the renamed keys come closest to."""

    def intended(layout: Layout) -> dict[str, str]:
        return {old: layout.from_official(source.to_official(old)) if explains(keymap, source, old) else old
                for old in mapping}

    def closeness(layout: Layout) -> tuple[int, int]:
        """Over the keys the user renamed: how many get this layout's name, and how many its first component."""
        names = intended(layout)
        pairs = [(new, names[old]) for old, new in mapping.items() if new != old]
        return (sum(new == name for new, name in pairs),
                sum(new.split(".", 1)[0] == name.split(".", 1)[0] for new, name in pairs))

    candidates = _reachable(keymap, source)
    nearest = max(candidates, key=closeness)  # the first of equals: keeping the source's names
    target = intended(nearest)
    differs = [old for old, new in mapping.items() if new != target[old]]
    old = next((old for old in differs if explains(keymap, source, old)), differs[0])  # a key map tensor first
    wrong = f"{mapping[old]} where {nearest.name} has {target[old]}"
    if nearest is source:
        alone = "" if len(candidates) > 1 else (f": no other {keymap.id} layout stores the weights as {source.name} "
                                                "does (vlhub convert transposes them)")
        return f"{wrong}; keep the {source.name} names{alone}"
    renames = " ".join(f"--rename {prefix}={replacement}" for prefix, replacement in layout_renames(source, nearest))
    return f"{wrong}; {renames}{' without --regex' if regex else ''} gives the {nearest.name} layout"


def layout_renames(source: Layout, target: Layout) -> list[tuple[str, str]]:
    """The prefix renames that turn `source`'s names into `target`'s, longest prefix first, from the official
    prefixes the two layouts declare."""
    officials = {official for official, _ in (*source.rename, *target.rename)}
    pairs = {(source.from_official(official), target.from_official(official)) for official in officials}
    return sorted((pair for pair in pairs if pair[0] != pair[1]), key=lambda pair: (-len(pair[0]), pair))


def _check_collisions(mapping: dict[str, str]) -> None:
    by_new: dict[str, list[str]] = defaultdict(list)
    for old, new in mapping.items():
        by_new[new].append(old)
    clashes = [(new, olds) for new, olds in by_new.items() if len(olds) > 1]
    if not clashes:
        return
    new, olds = clashes[0]
    names = ", ".join(repr(old) + (" (not renamed)" if old == new else "") for old in olds)
    more = f"; {len(clashes) - 1} more collisions" if len(clashes) > 1 else ""
    raise UserError(f"rename collision: {names} would {'both' if len(olds) == 2 else 'all'} be named {new!r}{more}")


def rename_keys(
    source: Path | str,
    renames: Sequence[tuple[str, str]],
    *,
    regex: bool = False,
    out: Path | str | None = None,
    in_place: bool = False,
    dry_run: bool = False,
    overwrite: bool = False,
    allow_unknown_layout: bool = False,
    progress: ProgressFactory | None = None,
) -> RenameResult:
    """Rename keys of the checkpoint at `source` (a directory, weight file or index file).

    Writes to `out` (a new directory for a directory or index source, with SRC's other files
    copied in; the output file for a single-file source) or, with `in_place`, replaces
    the source's weight files and index atomically. Everything is checked before anything is written,
    including that the result is a layout of the family's key map (unless `allow_unknown_layout`);
    on an error or Ctrl-C no temporary file is left behind.
    """
    if out is not None and in_place:
        raise UserError("--out and --in-place exclude each other: choose one")
    if out is None and not in_place and not dry_run:
        raise UserError("say where to write: --out PATH, or --in-place to replace SRC's weights (--dry-run only looks)")
    source = Path(source)
    # an in-place edit holds the write lock from before it reads: an edit by another process cannot land between
    # reading the headers and replacing the files
    edited = source if source.is_dir() or not source.name.endswith(".index.json") else source.parent
    with writing(edited) if in_place and not dry_run else nullcontext(), \
            open_checkpoint(source, bf16=False) as checkpoint:  # keep dtypes exactly as stored
        if checkpoint.format.name not in SUPPORTED_FORMATS:
            raise UserError(f"{source}: vlhub keys rewrites safetensors and pdparams checkpoints, "
                            f"not {checkpoint.format.name} ({checkpoint.shards[0]}); convert it first")
        mapping = plan_renames(checkpoint.tensors, renames, regex=regex)
        family, layout = renamed_layout(checkpoint, mapping, renames, regex=regex, allow_unknown=allow_unknown_layout)
        whole_directory = source.is_dir() or checkpoint.index_file is not None
        out_path = Path(out).absolute() if out is not None else None
        if in_place:
            _check_in_place(checkpoint, source)
            ensure_free_space(checkpoint.root, checkpoint.total_bytes, "the renamed weights")
        elif out_path is not None:
            _check_out(out_path, checkpoint.root if whole_directory else source, whole_directory, overwrite)
            ensure_free_space(out_path.parent, checkpoint.total_bytes, "the renamed weights")
        result = RenameResult(
            source, out_path or (source if in_place else None), dry_run,
            renamed=[(old, new) for old, new in mapping.items() if old != new],
            unchanged=sum(old == new for old, new in mapping.items()),
            family=family, layout=layout,
        )
        if dry_run:
            return result
        with progress(checkpoint.total_bytes) if progress else nullcontext(_ignore_bytes) as on_bytes:
            if out_path is None and not whole_directory and Manifest.read(checkpoint.root) is None:
                # one weight file among others the user keeps there: only that file is replaced
                result.written = [_write_file(checkpoint, mapping, source, on_bytes, durable=True)]
            elif out_path is None:  # not a dry run, so --in-place
                result.written = _rewrite_in_place(checkpoint, mapping, layout, on_bytes)
            elif whole_directory:
                result.written, result.copied = _write_directory(checkpoint, mapping, layout, out_path, on_bytes,
                                                                 overwrite=overwrite)
            else:
                result.written = [_write_file(checkpoint, mapping, out_path, on_bytes)]
    return result


def _ignore_bytes(n: int) -> None:
    """The progress callback when nobody watches."""


def _check_in_place(checkpoint: Checkpoint, source: Path) -> None:
    """Refuse to rewrite one shard of a sharded checkpoint alone: its index would then name stale keys."""
    if checkpoint.index_file is not None or source.is_dir():
        return
    index = source.parent / checkpoint.format.index_file
    if index.is_file():
        listed = source.name in _read_index(index)["weight_map"].values()
        if listed:
            raise UserError(f"{source} is one shard of {index}: pass the directory (or the index) to rename "
                            "every shard and the index together")


def _check_out(out: Path, source: Path, directory: bool, overwrite: bool) -> None:
    """`out` must be a new path (or an empty directory, or anything with --overwrite) and must not hold SRC."""
    refuse_output_holding(out, source)
    real_out, real_source = out.resolve(), source.resolve()
    if directory and real_source in real_out.parents:
        raise UserError(f"--out {out} is inside SRC {source}; choose a path outside it")
    if not os.path.lexists(out):
        return
    if directory and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory; choose another --out")
    if not directory and out.is_dir():
        raise UserError(f"{out} is a directory; for a single-file SRC, --out is the output file's path")
    occupied = not out.is_dir() or any(out.iterdir())
    if occupied and not overwrite:
        raise UserError(f"{out} exists and is not empty; pass --overwrite to replace it, or choose another --out")


def _write_directory(
    checkpoint: Checkpoint, mapping: dict[str, str], layout: str, out: Path, on_bytes: OnBytes, *, overwrite: bool
) -> tuple[list[Path], list[Path]]:
    """Build the whole output in a staging directory beside `out`, then publish it in one step."""
    with replacing(out, overwrite=overwrite, needed=checkpoint.total_bytes, what="the renamed weights") as staging:
        rewritten = _write_renamed(checkpoint, mapping, layout, staging, on_bytes, durable=False)
        carried = _carry_other_files(checkpoint.root, {checkpoint.root / name for name in rewritten}, staging)
    return [out / name for name in rewritten], [out / path.relative_to(staging) for path in carried]


def _write_renamed(
    checkpoint: Checkpoint, mapping: dict[str, str], layout: str, staging: Path, on_bytes: OnBytes, *, durable: bool
) -> list[str]:
    """Write the renamed shards, index and manifest into `staging`; the names written, relative to it."""
    rewritten = list(checkpoint.shards)
    for shard in checkpoint.shards:
        (staging / shard).parent.mkdir(parents=True, exist_ok=True)
        _write_shard(checkpoint, shard, mapping, staging / shard, on_bytes, durable=durable)
    if checkpoint.index_file is not None:
        write_json_atomic(staging / checkpoint.index_file, _renamed_index(checkpoint, mapping))
        rewritten.append(checkpoint.index_file)
    manifest = _renamed_manifest(checkpoint.root, {name: staging / name for name in rewritten}, layout)
    if manifest is not None:
        manifest.write(staging)
        rewritten.append(MANIFEST)
    return rewritten


def _write_file(
    checkpoint: Checkpoint, mapping: dict[str, str], out: Path, on_bytes: OnBytes, *, durable: bool = False
) -> Path:
    """Write the single-file checkpoint renamed to `out` (which may be the source itself) under a temporary
    name, then rename it over `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with writing(out):
        temp = temporary_name(out)
        try:
            _write_shard(checkpoint, checkpoint.shards[0], mapping, temp, on_bytes, durable=durable)
            commit_point("rename the renamed file into place")
            os.replace(temp, out)
        except OSError as error:
            temp.unlink(missing_ok=True)
            if is_disk_full(error):
                raise disk_full(out, checkpoint.total_bytes, "the renamed weights") from None
            raise
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
    return out


def _rewrite_in_place(checkpoint: Checkpoint, mapping: dict[str, str], layout: str, on_bytes: OnBytes) -> list[Path]:
    """Replace the checkpoint's folder by a renamed copy in one step: the new shards, index and manifest are
    written into a staging folder beside it, every other entry hard-linked in (no bytes copied), and the two
    folders are exchanged. A reader, or a run killed at any instant, sees the old folder or the new one.

    The new files are fsynced before the exchange: after a crash the originals, the only copy of the
    weights, must not be replaced by files whose data never reached the disk.
    """
    root = checkpoint.root.resolve()  # a symlinked folder: replace the folder it leads to, keep the link
    with replacing(root, overwrite=True, needed=checkpoint.total_bytes, what="the renamed weights") as staging:
        os.chmod(staging, os.stat(root).st_mode & 0o7777)
        rewritten = _write_renamed(checkpoint, mapping, layout, staging, on_bytes, durable=True)
        _link_other_entries(root, set(rewritten), staging)
    return [checkpoint.root / name for name in rewritten]


def _link_other_entries(root: Path, rewritten: set[str], staging: Path, relative: Path = Path()) -> None:
    """Give `staging` every entry of `root` that is not rewritten: files as hard links, symlinks as symlinks
    (relative ones still lead where they did: `staging` is `root`'s sibling), folders recreated. vlhub's
    own temporaries and locks there are dropped."""
    for entry in os.scandir(root / relative):
        name = (relative / entry.name).as_posix()
        if is_owned_name(entry.name) or name in rewritten:
            continue
        target = staging / name
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), target)
        elif entry.is_dir():
            target.mkdir(exist_ok=True)  # it may hold a rewritten shard already
            _link_other_entries(root, rewritten, staging, relative / entry.name)
        else:
            try:
                os.link(entry.path, target)
            except OSError:  # a filesystem without hard links: a copy
                shutil.copy2(entry.path, target)


def _renamed_index(checkpoint: Checkpoint, mapping: dict[str, str]) -> dict:
    """The source's index with its weight_map keys renamed (shards and every other field kept)."""
    assert checkpoint.index_file is not None
    index = _read_index(checkpoint.root / checkpoint.index_file)
    return {**index, "weight_map": {mapping[name]: shard for name, shard in index["weight_map"].items()}}


def _read_index(path: Path) -> dict:
    """An index.json read as the checkpoint reader reads it, refused in one line without a weight_map."""
    index = read_json_file(path, MAX_INDEX_BYTES)
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise CorruptCheckpoint(f"{path}: no valid weight_map")
    return index


def _renamed_manifest(root: Path, rewritten: dict[str, Path], layout: str) -> Manifest | None:
    """The vlhub manifest in `root` (None if there is none) describing the renamed checkpoint instead: the sha256
    and size of each rewritten file (name relative to `root` -> where it is now) and the new key layout."""
    manifest = Manifest.read(root)
    if manifest is None:
        return None  # not one vlhub wrote: nothing to keep in step
    for name, path in rewritten.items():
        manifest.files[name] = FileEntry.of(path)
    manifest.target.layout = layout
    if layout == UNKNOWN:
        manifest.smoke = None  # its verdict was for keys a loader found; these it will not
    return manifest


def _carry_other_files(root: Path, rewritten: set[Path], staging: Path) -> list[Path]:
    """Copy everything in `root` that is not rewritten, hidden or a manifest of the old weights.

    Copies, not hard links: editing the new config.json in place must not edit the source's too.
    """
    carried: list[Path] = []

    def copy(src: str, dst: str) -> str:
        shutil.copy2(src, dst)  # follows a symlink (a Hugging Face cache snapshot) to the file itself
        carried.append(Path(dst))
        return dst

    def ignored(directory: str, names: list[str]) -> set[str]:
        # hidden entries are caches and stale temporaries (.cache/huggingface describes the old weights);
        # a vlhub manifest lists the old files' hashes (_renamed_manifest writes the new one)
        return {name for name in names
                if name.startswith(".") or name == MANIFEST or Path(directory, name) in rewritten}

    shutil.copytree(root, staging, ignore=ignored, copy_function=copy, dirs_exist_ok=True)
    return carried


def _write_shard(
    checkpoint: Checkpoint, shard: str, mapping: dict[str, str], target: Path, on_bytes: OnBytes, *, durable: bool
) -> None:
    metas = [meta for meta in checkpoint.tensors.values() if meta.shard == shard]
    with open(target, "wb") as stream:
        if checkpoint.format.name == "safetensors":
            _write_safetensors(checkpoint.root / shard, metas, mapping, stream, on_bytes)
        else:
            _write_pdparams(checkpoint, metas, mapping, stream, on_bytes)
        if durable:
            stream.flush()
            os.fsync(stream.fileno())


def _write_safetensors(
    path: Path, metas: list[TensorMeta], mapping: dict[str, str], stream: BinaryIO, on_bytes: OnBytes
) -> None:
    """Only the header changes: write the renamed header, then copy the data section verbatim."""
    with SafetensorsFile(path) as source:
        spans = sorted(((source.stored_bytes(meta.name), meta) for meta in metas), key=lambda s: s[0].offset)
        renamed = [replace(meta, name=mapping[meta.name]) for _, meta in spans]
        # the writer's constructor writes the header for these tensors in data order; the data follows as is
        SafetensorsShardWriter(stream, renamed, source.metadata)
    for run in _contiguous_runs([span for span, _ in spans]):
        copy_stored_bytes(run, stream, on_bytes)


def _contiguous_runs(spans: list[StoredBytes]) -> list[StoredBytes]:
    """Merge byte ranges that follow each other (all of them, in a file without gaps) into single copies."""
    runs: list[StoredBytes] = []
    for span in spans:
        if runs and runs[-1].offset + runs[-1].length == span.offset:
            runs[-1] = replace(runs[-1], length=runs[-1].length + span.length)
        else:
            runs.append(span)
    return runs


def _write_pdparams(
    checkpoint: Checkpoint, metas: list[TensorMeta], mapping: dict[str, str], stream: BinaryIO, on_bytes: OnBytes
) -> None:
    """A new pickle, each payload copied from where it lies (read and re-encoded only if it is not plain)."""
    renamed = [replace(meta, name=mapping[meta.name]) for meta in metas]
    writer = checkpoint.format.writer(stream, renamed)
    for meta, target in zip(metas, renamed):
        writer.write(target, checkpoint.stored_bytes(meta.name) or checkpoint.read(meta.name))
        on_bytes(meta.nbytes)
    writer.finish()
