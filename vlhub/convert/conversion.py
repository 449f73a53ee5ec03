"""`vlhub convert`'s library side: a source's headers read once, its conversion planned once, written streaming.

    with open_source(locate_source("tiny-qwen2-vl")) as source:
        conversion = source.plan(target.output)              # target: one of vlhub.targets
        result = conversion.write(out)                          # or conversion.plan for a dry run

Everything lands in a staging directory beside the output and is renamed into place at the end; an error or an
interruption leaves nothing behind. A deployment layout writes its weights with `write_into`, inside its own
staging directory.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from vlhub.atomic import staged_directory
from vlhub.convert.configs import official_config, target_config
from vlhub.convert.ops import FLOAT_DTYPES
from vlhub.convert.pipeline import MEMORY_BUDGET, ordered_steps, run_plan
from vlhub.convert.plan import Plan, checkpoint_family, plan_conversion
from vlhub.errors import UserError
from vlhub.family_registry import FAMILIES, Family
from vlhub.formats.readers import Checkpoint, open_checkpoint
from vlhub.formats.registry import format_of_file
from vlhub.formats.tensors import TensorMeta
from vlhub.formats.writers import CheckpointWriter, file_sha256, write_json_atomic
from vlhub.hub.sources import Source
from vlhub.keymaps import FAMILY_FILES, KeyMap, load_keymap
from vlhub.manifest import MANIFEST, FileEntry, Manifest, SourceRecord, TargetRecord

# files a converted directory must not inherit: weights and indexes (a loader could pick a stale one)
_NOT_CARRIED = (".index.json", ".safetensors", ".pdparams", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class Output:
    """What a conversion writes: the key layout (or the first of several that the family's key map declares) and
    the file format (None: the one that layout declares, e.g. PaddleMIX's pdparams, PaddleFormers' safetensors).
    `name` is the checkpoint target it is, recorded in the manifest."""

    layout: str | tuple[str, ...]
    format: str | None = None
    name: str | None = None

    def layout_in(self, keymap: KeyMap) -> str:
        """The layout this output writes for a family: its first candidate the key map declares."""
        candidates = (self.layout,) if isinstance(self.layout, str) else self.layout
        return next((name for name in candidates if name in keymap.layouts), candidates[-1])

    def format_in(self, keymap: KeyMap) -> str:
        """The file format this output writes for a family."""
        if self.format is not None:
            return self.format
        layout = keymap.layout(self.layout_in(keymap))
        assert layout.format is not None, f"{keymap.id} layout {layout.name} declares no format"
        return layout.format

    def formats(self) -> set[str]:
        """Every format it may write, whichever the family."""
        if self.format is not None:
            return {self.format}
        keymaps = [load_keymap(name) for name in FAMILY_FILES]
        return {self.format_in(keymap) for keymap in keymaps if self.layout_in(keymap) in keymap.layouts}


@dataclass(frozen=True)
class Model:
    """What a target checks its options against: the family, its flat official config, and the dtype most of the
    weights' bytes have."""

    family: Family
    config: dict
    dtype: str


@dataclass
class ConvertResult:
    out: Path
    manifest: Manifest


@dataclass
class OpenSource:
    """A source's headers, read once (for a catalog model not on this machine: its official tensor list)."""

    source: Source
    tensors: dict[str, TensorMeta]
    config: dict  # config.json as read
    format: str
    checkpoint: Checkpoint | None  # None: not on this machine, so only a dry run can plan it
    extra_files: list[Path] = field(default_factory=list)

    @cached_property
    def model(self) -> Model:
        """The family, flat config and dtype (refusing a checkpoint without config.json or of no known family)."""
        family = FAMILIES[checkpoint_family(self.tensors, self.config)]
        return Model(family, official_config(self.config), stored_dtype(self.tensors.values()))

    def plan(self, output: Output, *, dtype: str | None = None, allow_unmatched: bool = False) -> Conversion:
        """The conversion to `output` (headers only), casting floating tensors to `dtype`."""
        plan = plan_conversion(self.tensors, self.config, target_layout=output.layout, dtype=dtype,
                               allow_unmatched=allow_unmatched)
        return Conversion(self.source, output, plan, self.config, self.checkpoint, self.format, self.extra_files)

    def close(self) -> None:
        if self.checkpoint is not None:
            self.checkpoint.close()

    def __enter__(self) -> OpenSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(source: Source) -> OpenSource:
    """Read the source's headers (a catalog model not on this machine: its official tensors, as bfloat16)."""
    if source.path is None:
        assert source.model is not None
        family = source.model.family
        tensors = {name: TensorMeta(name, "bfloat16", shape, family.checkpoint_format)
                   for name, shape in family.official_tensors(source.model.config)}
        return OpenSource(source, tensors, source.model.config, family.checkpoint_format, None)
    checkpoint = open_checkpoint(source.path)
    extra = (_carried_files(checkpoint.root)
             if source.path.is_dir() or source.path.name.endswith(".index.json") else [])
    return OpenSource(source, checkpoint.tensors, checkpoint.config or {}, checkpoint.format.name, checkpoint, extra)


def stored_dtype(tensors: Iterable[TensorMeta]) -> str:
    """The floating dtype most of the tensors' bytes have (bfloat16 when none is floating)."""
    by_dtype = Counter[str]()
    for meta in tensors:
        if meta.dtype in FLOAT_DTYPES:
            by_dtype[meta.dtype] += meta.nbytes
    return by_dtype.most_common(1)[0][0] if by_dtype else "bfloat16"


@dataclass
class Conversion:
    """A planned conversion: `plan` says what will happen; `write()` does it."""

    source: Source
    output: Output
    plan: Plan
    config: dict  # the source's config.json as read
    checkpoint: Checkpoint | None
    source_format: str
    extra_files: list[Path] = field(default_factory=list)

    @property
    def family(self) -> Family:
        return FAMILIES[self.plan.family]

    @property
    def format(self) -> str:
        """The file format it writes."""
        return self.output.format_in(self.plan.keymap)

    def write(self, out: Path, *, overwrite: bool = False, max_shard_size: int | None = None,
              on_bytes: Callable[[int], None] | None = None, memory_budget: int | None = None) -> ConvertResult:
        """Convert into `out`, atomically, then close the source."""
        source = self._local()
        out = Path(out)
        needed = self.plan.total_bytes + sum(p.stat().st_size for p in self.extra_files)
        try:
            with staged_directory(out, source, overwrite=overwrite, needed=needed,
                                  what="the converted weights") as staging:
                manifest = self.write_into(staging, max_shard_size=max_shard_size, on_bytes=on_bytes,
                                           memory_budget=memory_budget, published_as=out)
        finally:
            self.close()
        return ConvertResult(out, manifest)

    def write_into(self, directory: Path, *, max_shard_size: int | None = None,
                   on_bytes: Callable[[int], None] | None = None, memory_budget: int | None = None,
                   published_as: Path | None = None,
                   edit_config: Callable[[dict], None] | None = None) -> Manifest:
        """Write the weights, config.json (changed by `edit_config`, if given), the carried files and the manifest
        into `directory`, which the caller stages; `published_as` is where `directory` ends up."""
        self._local()
        assert self.checkpoint is not None
        directory.mkdir(parents=True, exist_ok=True)
        steps = ordered_steps(self.plan, self.checkpoint)
        metadata = {"format": "pt"} if self.format == "safetensors" else None
        with CheckpointWriter(directory, self.format, [s.target for s in steps],
                              max_shard_size=max_shard_size, metadata=metadata, on_bytes=on_bytes) as writer:
            # large tensors go in tiles, so one budget serves any model size
            run_plan(self.plan, self.checkpoint, writer, memory_budget=memory_budget or MEMORY_BUDGET)
        files = dict(writer.sha256)
        for extra in self.extra_files:
            shutil.copy2(extra, directory / extra.name)
            files[extra.name] = file_sha256(directory / extra.name)
        config = target_config(self.config, dtype=self.output_dtype(), for_paddle=self.format == "pdparams")
        names_itself = self.family.paddle_facts.get("config_self_path")
        if self.format == "pdparams" and names_itself:
            # a Paddle loader of this family builds its LLM from the config this field names: its own directory
            config[names_itself] = str((published_as or directory).absolute())
        if edit_config is not None:
            edit_config(config)
        files["config.json"] = file_sha256(write_json_atomic(directory / "config.json", config))
        manifest = self._manifest({name: FileEntry(digest, (directory / name).stat().st_size)
                                   for name, digest in sorted(files.items())})
        manifest.write(directory)
        return manifest

    def close(self) -> None:
        if self.checkpoint is not None:
            self.checkpoint.close()

    def output_dtype(self) -> str:
        """The dtype most of the output's bytes have (what config.json should declare)."""
        return stored_dtype(step.target for step in self.plan.steps)

    def _local(self) -> Path:
        if self.checkpoint is None or self.source.path is None:
            raise UserError(f"{self.source.given} is not on this machine: only --dry-run can plan it")
        return self.source.path

    def _manifest(self, files: dict[str, FileEntry]) -> Manifest:
        model = self.source.model
        source = SourceRecord(_absolute(self._local()), model.name if model else None,
                              model.hf_repo if model else None, self.source.revision, self.source_format,
                              self.plan.source_layout)
        target = TargetRecord(name=self.output.name, format=self.format, layout=self.plan.target_layout,
                              dtype=self.plan.dtype or "unchanged")
        return Manifest(source, target, files, keymap={"id": self.plan.keymap.id, "digest": self.plan.keymap.digest},
                        ops=self.plan.op_counts, tensors=len(self.plan.steps), total_bytes=self.plan.total_bytes)


def _absolute(path: Path) -> str:
    """The source's path as the manifest records it: absolute and resolved, so `vlhub smoke` finds it from any
    directory; a file keeps its own name (a hub snapshot's file is a link to a blob named by its hash)."""
    return str(path.resolve() if path.is_dir() else path.parent.resolve() / path.name)


def _carried_files(root: Path) -> list[Path]:
    """Tokenizer, processor, generation and chat-template files: everything but weights and config."""
    return sorted(
        p for p in root.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name not in ("config.json", MANIFEST)
        and not p.name.endswith(_NOT_CARRIED) and format_of_file(p.name) is None
    )


def plan_table_rows(plan: Plan) -> Iterator[tuple[str, str, str, str, str, int]]:
    """(source name, target name, shape before, shape after, ops, bytes) for a dry-run table."""
    for step in plan.steps:
        yield (step.source.name, step.target.name, "x".join(map(str, step.source.shape)),
               "x".join(map(str, step.target.shape)), ", ".join(step.ops) or "copy", step.target.nbytes)


def plan_json(plan: Plan) -> dict:
    return {
        "family": plan.family,
        "keymap": plan.keymap.id,
        "source_layout": plan.source_layout,
        "target_layout": plan.target_layout,
        "dtype": plan.dtype,
        "ops": plan.op_counts,
        "tensors": len(plan.steps),
        "total_bytes": plan.total_bytes,
        "dropped": plan.dropped,
        "steps": [dict(zip(("source", "target", "shape_before", "shape_after", "ops", "bytes"), row))
                  for row in plan_table_rows(plan)],
    }
