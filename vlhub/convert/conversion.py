"""`vlhub convert`: a checkpoint in any supported layout and format to torch, safetensors or Paddle.

    conversion = prepare_conversion("tiny-qwen2-vl", to="paddle")
    result = conversion.write()            # or conversion.plan for a dry run

Everything lands in a staging directory beside the output and is renamed into place at the end;
an error or an interruption leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vlhub import __version__
from vlhub.atomic import staged_directory
from vlhub.catalog import ModelSpec, find_model
from vlhub.convert.configs import target_config
from vlhub.convert.pipeline import buffer_cost, ordered_steps, run_plan
from vlhub.convert.plan import Plan, plan_conversion
from vlhub.errors import UserError
from vlhub.formats.readers import Checkpoint, open_checkpoint
from vlhub.formats.registry import format_of_file
from vlhub.formats.tensors import TensorMeta
from vlhub.formats.writers import CheckpointWriter, file_entry, file_sha256, write_json_atomic
from vlhub.hub.sources import resolve_source
from vlhub.hub.store import MANIFEST, conversion_output, revision_of
from vlhub.units import now_iso

# --to name -> (key-map layout, or the first of several the family declares; file format)
TARGETS: dict[str, tuple[str | tuple[str, ...], str]] = {
    "paddle": ("paddlemix", "pdparams"),
    # the names Paddle's inference loaders read: Qwen-VL's own layout, PaddleMIX's for the others
    "paddle-inference": (("paddle-inference", "paddlemix"), "pdparams"),
    "safetensors": ("official", "safetensors"),
    # the Hugging Face directory TPU-MLIR's llm_convert reads (vlhub.targets.tpu_mlir.build builds the rest)
    "tpu-mlir": ("official", "safetensors"),
    # the HF folder vamc's frontend.checkpoint names (vlhub.targets.vamc.build builds the rest)
    "vamc": ("official", "safetensors"),
    "torch": ("official", "torch"),
}
# files a converted directory must not inherit: weights and indexes (a loader could pick a stale one)
_NOT_CARRIED = (".index.json", ".safetensors", ".pdparams", ".bin", ".pt", ".pth")


@dataclass
class ConvertResult:
    out: Path
    files: dict[str, str]  # file name -> sha256
    manifest: dict


@dataclass
class Conversion:
    """A planned conversion: `plan` says what will happen; `write()` does it."""

    source: str
    source_path: Path | None  # None for a dry run of a catalog model that is not on this machine
    to: str
    plan: Plan
    config: dict
    checkpoint: Checkpoint | None
    source_format: str
    model: ModelSpec | None = None
    extra_files: list[Path] = field(default_factory=list)
    allow_unmatched: bool = False

    @property
    def target_format(self) -> str:
        return TARGETS[self.to][1]

    def default_out(self, max_shard_size: int | None = None) -> Path:
        """The cache for a catalog model (keyed by revision, target and the options that change the output),
        else beside the source."""
        options = {"dtype": self.plan.dtype, "max_shard_size": max_shard_size, "allow_unmatched": self.allow_unmatched}
        return conversion_output(self.model, self.source_path, self.to, options)

    def write(
        self,
        out: Path | None = None,
        *,
        overwrite: bool = False,
        max_shard_size: int | None = None,
        on_bytes: Callable[[int], None] | None = None,
        memory_budget: int | None = None,
        published_as: Path | None = None,
    ) -> ConvertResult:
        """Convert into `out` (default: beside the source), atomically. `published_as` is where `out` ends up
        when a layout's staging directory holding it is swapped in (default: `out`)."""
        if self.checkpoint is None:
            raise UserError(f"{self.source} is not on this machine: only --dry-run can plan it")
        out = Path(out) if out else self.default_out(max_shard_size)
        needed = self.plan.total_bytes + sum(p.stat().st_size for p in self.extra_files)
        try:
            with staged_directory(out, self.source_path, overwrite=overwrite, needed=needed,
                                  what="the converted weights") as staging:
                steps = ordered_steps(self.plan, self.checkpoint)
                metadata = {"format": "pt"} if self.target_format == "safetensors" else None
                with CheckpointWriter(staging, self.target_format, [s.target for s in steps],
                                      max_shard_size=max_shard_size, metadata=metadata, on_bytes=on_bytes) as writer:
                    # room for the largest tensor and its transposed copy; smaller ones pipeline within it
                    largest = max((buffer_cost(s) for s in steps), default=0)
                    run_plan(self.plan, self.checkpoint, writer,
                             memory_budget=memory_budget or max(largest, 512 << 20))
                files = dict(writer.sha256)
                for extra in self.extra_files:
                    shutil.copy2(extra, staging / extra.name)
                    files[extra.name] = file_sha256(staging / extra.name)
                config = target_config(self.config, dtype=self.output_dtype(),
                                       for_paddle=self.target_format == "pdparams")
                if self.target_format == "pdparams" and self.plan.family == "qwen_vl":
                    # PaddleMIX's Qwen-VL builds its LLM from the config this field names: its own directory
                    config["llm_pretrained_model_name_or_path"] = str((published_as or out).absolute())
                files["config.json"] = file_sha256(write_json_atomic(staging / "config.json", config))
                manifest = self._manifest(files, staging)
                write_json_atomic(staging / MANIFEST, manifest)
        finally:
            self.checkpoint.close()
        return ConvertResult(out, files, manifest)

    def output_dtype(self) -> str:
        """The dtype most of the output's bytes have (what config.json should declare)."""
        by_dtype: dict[str, int] = {}
        for step in self.plan.steps:
            by_dtype[step.target.dtype] = by_dtype.get(step.target.dtype, 0) + step.target.nbytes
        return max(by_dtype, key=by_dtype.__getitem__) if by_dtype else "bfloat16"

    def _manifest(self, files: dict[str, str], staging: Path) -> dict:
        fmt = TARGETS[self.to][1]
        layout = self.plan.target_layout
        return {
            "vlhub_version": __version__,
            "created": now_iso(),
            "source": {
                "path": str(self.source_path),
                "model": self.model.name if self.model else None,
                "repo": self.model.hf_repo if self.model else None,
                "revision": revision_of(self.source_path),
                "format": self.source_format,
                "layout": self.plan.source_layout,
            },
            "keymap": {"id": self.plan.keymap.id, "digest": self.plan.keymap.digest},
            "target": {"format": fmt, "layout": layout, "dtype": self.plan.dtype or "unchanged"},
            "ops": self.plan.op_counts,
            "tensors": len(self.plan.steps),
            "total_bytes": self.plan.total_bytes,
            "files": {name: {"sha256": digest, "size": (staging / name).stat().st_size}
                      for name, digest in sorted(files.items())},
        }


def prepare_conversion(
    source: str,
    *,
    to: str,
    dtype: str | None = None,
    allow_unmatched: bool = False,
    dry_run: bool = False,
) -> Conversion:
    """Read the source's headers and plan the conversion; nothing is read or written beyond headers."""
    if to not in TARGETS:
        raise UserError(f"unknown target format {to!r}; choose one of {', '.join(TARGETS)}")
    model = find_model(source)
    try:
        path = resolve_source(source)
    except UserError:
        if not (dry_run and model is not None):
            raise
        # a dry run of a catalog model needs no data: plan from its official tensor list
        tensors = {name: TensorMeta(name, "bfloat16", shape, model.family.checkpoint_format)
                   for name, shape in model.family.official_tensors(model.config)}
        plan = plan_conversion(tensors, model.config, target_layout=TARGETS[to][0], dtype=dtype)
        return Conversion(source, None, to, plan, model.config, None, model.family.checkpoint_format, model)
    checkpoint = open_checkpoint(path)
    try:
        plan = plan_conversion(checkpoint.tensors, checkpoint.config, target_layout=TARGETS[to][0],
                               dtype=dtype, allow_unmatched=allow_unmatched)
    except BaseException:
        checkpoint.close()
        raise
    extra = _carried_files(checkpoint.root) if path.is_dir() or path.name.endswith(".index.json") else []
    return Conversion(source, path, to, plan, checkpoint.config or {}, checkpoint, checkpoint.format.name,
                      model, extra, allow_unmatched)


def _carried_files(root: Path) -> list[Path]:
    """Tokenizer, processor, generation and chat-template files: everything but weights and config."""
    return sorted(
        p for p in root.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name not in ("config.json", MANIFEST)
        and not p.name.endswith(_NOT_CARRIED) and format_of_file(p.name) is None
    )


def refresh_manifest_entry(directory: Path, name: str) -> None:
    """Record the new sha256 and size of `name`, rewritten after `directory` was converted, in its manifest."""
    manifest_path = directory / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][name] = file_entry(directory / name)
    write_json_atomic(manifest_path, manifest)


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

