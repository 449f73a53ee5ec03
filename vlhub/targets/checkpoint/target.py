"""The checkpoint targets: what Paddle's loaders of the family read (`--to paddle`: PaddleMIX's names in pdparams, or
for Qwen3-VL PaddleFormers' safetensors, which are the official ones), the official names in safetensors or torch
`.bin` (`--to safetensors`, `--to torch`). The output is the weight folder; its smoke test runs it in Paddle or in
the numpy reference."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from vlhub.convert.conversion import Conversion, Model, Output
from vlhub.convert.ops import FLOAT_DTYPES
from vlhub.deploy.checks import Check, Need, paddle_check
from vlhub.deploy.target import OnBytes, Say, TargetDefaults, flag
from vlhub.errors import Note
from vlhub.manifest import Manifest
from vlhub.smoke.run import CheckpointRunner
from vlhub.units import parse_size


@dataclass(frozen=True)
class CheckpointOptions:
    """What `vlhub convert --to <checkpoint format>` takes."""

    dtype: str | None = flag(f"Cast floating tensors: {', '.join(FLOAT_DTYPES[:-1])} or {FLOAT_DTYPES[-1]} "
                             "(default: keep each tensor's dtype).", metavar=f"[{'|'.join(FLOAT_DTYPES)}]")
    max_shard_size: str | None = flag("Largest shard, e.g. 5GB or 2GiB (default: 5GB safetensors, 10GB pdparams "
                                      "and torch).")
    allow_unmatched: bool = flag("Pass tensors the key map does not know through unchanged.", default=False)


@dataclass(frozen=True)
class CheckpointSpec:
    """The options as the conversion uses them (the dtype is checked when it is planned)."""

    dtype: str | None
    max_shard_size: int | None
    allow_unmatched: bool

    def cache_key(self) -> dict[str, object]:
        return {"dtype": self.dtype, "max_shard_size": self.max_shard_size, "allow_unmatched": self.allow_unmatched}


@dataclass(frozen=True)
class CheckpointTarget(TargetDefaults):
    """One checkpoint format as a target: the output is the weight folder, nothing is compiled."""

    name: str
    output: Output
    options: type = CheckpointOptions
    is_layout: bool = False
    summary: str = ""
    runtime: str | None = None  # what its smoke test runs the output in (None: by the weights' format)

    def settle(self, options: CheckpointOptions, model: Model, *, smoke: bool) -> CheckpointSpec:
        shard = parse_size(options.max_shard_size) if options.max_shard_size else None
        return CheckpointSpec(options.dtype, shard, options.allow_unmatched)

    def progress(self, conversion: Conversion, spec: CheckpointSpec) -> tuple[str, int]:
        return f"converting to {self.name}", conversion.plan.total_bytes

    def build(self, conversion: Conversion, spec: CheckpointSpec, out: Path, *, overwrite: bool,
              on_bytes: OnBytes, say: Say = None) -> Manifest:
        for note in conversion.plan.keymap.drop_notes(conversion.plan.dropped):  # the names and why, on stderr
            warnings.warn(note, Note, stacklevel=1)
        return conversion.write(out, overwrite=overwrite, max_shard_size=spec.max_shard_size,
                                on_bytes=on_bytes).manifest

    def smoke_runner(self, layout: Path, manifest: Manifest | None, options: object) -> CheckpointRunner:
        return CheckpointRunner(layout, self.runtime)

    def toolchain_checks(self, family: str | None, weights: Path | None) -> list[Check]:
        # Paddle's loaders (and the smoke test) read the weights with paddlepaddle; the others need nothing here
        return [paddle_check(required=False)] if self.runtime == "paddle" else []

    def next_needs(self, params: int, model_bytes: int, where: str) -> list[Need]:
        return [Need("load", "memory", model_bytes, None, "the whole model in its stored dtype")]


# each family's Paddle layout declares its format (PaddleMIX's pdparams; PaddleFormers' safetensors)
PADDLE = CheckpointTarget("paddle", Output(("paddlemix", "paddleformers"), name="paddle"), runtime="paddle")
SAFETENSORS = CheckpointTarget("safetensors", Output("official", "safetensors", name="safetensors"))
TORCH = CheckpointTarget("torch", Output("official", "torch", name="torch"))
