"""TPU-MLIR's compile sizes for planned inputs: `--max-pixels WxH` (llm_convert's --max_pixels W,H, width first)
and --seq-length, as `vlhub plan` prints them and `--to tpu-mlir` checks them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from vlhub.family_registry import Family
from vlhub.formats.readers import config_dtype
from vlhub.sizes import CompileSizes, InputPlan, Sizing
from vlhub.targets.tpu_mlir import NAME
from vlhub.targets.tpu_mlir.build import TpuOptions, tpu_facts, tpu_options, vision_fields


@dataclass(frozen=True)
class TpuPlan:
    """The llm_convert options that hold the planned inputs."""

    options: TpuOptions
    dynamic: str | None = None  # why the family's converter always compiles dynamic networks (`dynamic_forced`)

    def command_options(self) -> str:
        width, height = self.options.max_pixels
        return f"--seq-length {self.options.seq_length} --max-pixels {width}x{height}"

    def summary(self) -> str:
        width, height = self.options.max_pixels
        return (f"images resized up to {width}x{height} ({self.options.vision_patches} patches), seq length "
                f"{self.options.seq_length}")

    def rows(self, sizing: Sizing, command: str | None) -> list[tuple[str, str, str]]:
        width, height = self.options.max_pixels
        dynamic = f"; dynamic networks: {self.dynamic}" if self.dynamic else ""
        return [(NAME, f"--max_pixels {width},{height} --seq_length {self.options.seq_length}",
                 f"llm_convert's width,height: a ViT of {self.options.vision_patches} patches{dynamic}; {command}")]

    def to_json(self) -> dict:
        return {"max_pixels": list(self.options.max_pixels), "seq_length": self.options.seq_length,
                "vision_patches": self.options.vision_patches, "vision_tokens": self.options.vision_tokens,
                **({"dynamic": self.dynamic} if self.dynamic else {})}


def tpu_mlir_options(family: Family, config: dict, inputs: Sequence[InputPlan], sizes: CompileSizes) -> TpuOptions:
    """llm_convert's --max_pixels (width, height) and --seq-length for `inputs` (planned into `sizes`), checked as
    `vlhub convert --to tpu-mlir` checks them: the largest input's resized size; a video, or a side under two
    merged tokens (56 pixels for Qwen2(.5)-VL, 64 for Qwen3-VL), gets a near-square budget of as many squares of
    one merged token (the config's patch side x merge size)."""
    largest = max(inputs, key=lambda item: item.patches)
    height, width = largest.resized
    vision = vision_fields(config, tpu_facts(family, config))
    merge = int(vision["spatial_merge_size"])
    factor = int(vision["patch_size"]) * merge
    if largest.frames is not None or min(height, width) < 2 * factor:
        squares = largest.patches // merge ** 2
        across = max(2, math.isqrt(squares - 1) + 1)
        width, height = across * factor, max(2, -(-squares // across)) * factor
    return tpu_options(family, config, config_dtype(config) or "bfloat16", seq_length=sizes.max_length,
                       max_pixels=f"{width}x{height}")


def tpu_plan(sizing: Sizing) -> TpuPlan:
    """The options that hold the planned inputs."""
    dynamic = tpu_facts(sizing.family, sizing.config).get("dynamic_forced")
    return TpuPlan(tpu_mlir_options(sizing.family, sizing.config, sizing.inputs, sizing.sizes), dynamic)
