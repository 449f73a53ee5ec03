"""vamc's compile sizes: the visual network's N and the LLM's prefill and context, as `vlhub plan` prints them and
`--to vamc` (its defaults, its checks, `vamc_problems`) compiles them, so a command plan prints is one convert
accepts. Sources: VastModelZOO vlm/qwen2_vl/README.md and build_in/build/*.yaml (multiples of 16, N x 14^2 pixels,
640-column outputs)."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby

from vlhub.errors import UserError
from vlhub.keymaps.config import text_config
from vlhub.sizes import (
    ALIGN,
    DEFAULT_ANSWER_TOKENS,
    DEFAULT_PROMPT_TOKENS,
    Sizing,
    max_pixels_for,
    patch_multiple,
    position_limit,
    round_up,
)
from vlhub.smoke.inputs import SMOKE_PATCHES, VisionGeometry
from vlhub.units import plural

NAME = "vamc"
OUTPUT_CHUNK = 640  # vamc splits the visual output into columns of at most 640 (vlm/qwen2_vl/README.md Tips)
# The visual network's attention_mask input is [1, N, N]: 128 MB of float16 at 8192; the published vamc builds
# use 4096 to 6144, and the 7-hour compile grows with N.
MAX_VAMC_PATCHES = 8192


@dataclass(frozen=True)
class VamcPlan:
    """The vamc compile numbers: the visual yaml's N and the LLM yaml's input_ids [[prefill], [max]]."""

    visual_patches: int  # N: --patches when given, else the computed size
    given: bool
    max_pixels: int  # the largest image N holds (vastgenx --max_pixels): N * patch**2
    prefill_length: int
    max_length: int
    output_split: tuple[int, ...]  # the visual output's column chunks (output_layout entries)

    def command_options(self) -> str | None:
        if self.visual_patches > MAX_VAMC_PATCHES:
            return None
        options = f"--max-pixels {self.max_pixels} --prefill-len {self.prefill_length} --max-len {self.max_length}"
        if self.visual_patches < SMOKE_PATCHES:  # convert's smoke test pads the smoke image to N rows
            options += " --no-smoke"
        return options

    def summary(self) -> str:
        return f"visual N {self.visual_patches}, prefill {self.prefill_length}, context {self.max_length}"

    def rows(self, sizing: Sizing, command: str | None) -> list[tuple[str, str, str]]:
        misses = sum(item.patches > sizing.fit_patches for item in sizing.inputs)
        if not self.given:
            given = "the visual yaml's N"
        elif misses:
            verb = "exceeds" if misses == 1 else "exceed"
            given = (f"given; {misses} of {plural(len(sizing.inputs), 'input')} {verb} it, "
                     f"{sizing.sizes.visual_patches} holds them all")
        else:
            given = "given; every input fits it"
        runs = [(width, len(list(run))) for width, run in groupby(self.output_split)]
        return [
            ("vamc N", str(self.visual_patches), given),
            ("vamc max_pixels", str(self.max_pixels),
             f"the largest image N allows (N x 14 x 14): give vastgenx --max_pixels {self.max_pixels} or less"),
            ("vamc input_ids", f"[[{self.prefill_length}],[{self.max_length}]]",
             (f"the LLM yaml's prefill (N's visual tokens + {sizing.prompt_tokens} prompt) and max context, "
              "rounded up to 16")),
            ("vamc output split", " + ".join(f"{n} x {width}" if n > 1 else str(width) for width, n in runs),
             "visual output columns, one output_layout entry each"),
            (NAME, f"--max-pixels {self.max_pixels}",
             command or f"vlhub builds N up to {MAX_VAMC_PATCHES}: lower --max-pixels"),
        ]

    def to_json(self) -> dict:
        return {"visual_patches": self.visual_patches, "given": self.given, "max_pixels": self.max_pixels,
                "input_ids": [[self.prefill_length], [self.max_length]], "output_split": list(self.output_split)}


def vamc_plan(sizing: Sizing) -> VamcPlan:
    """The vamc numbers for the planned inputs: N is `sizing.fit_patches`, the LLM's lengths sized from it."""
    config, patches = sizing.config, sizing.fit_patches
    lengths = vamc_lengths(config, patches, prompt_tokens=sizing.prompt_tokens, answer_tokens=sizing.answer_tokens)
    return VamcPlan(patches, sizing.patches_given, max_pixels_for(config, patches), *lengths,
                    tuple(visual_output_split(text_config(config)["hidden_size"])))


def vamc_lengths(config: dict, patches: int, *, prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
                 answer_tokens: int = DEFAULT_ANSWER_TOKENS, prefill: int | None = None,
                 longest: int | None = None) -> tuple[int, int]:
    """The vamc LLM's (prefill, context) for a visual N of `patches`: a given one checked, else N's visual
    tokens plus `prompt_tokens`, and the prefill plus `answer_tokens` (at most max_position_embeddings), both
    rounded up to 16."""
    # the visual network returns N / 4 rows whatever the image; VastModelZOO's vlm/qwen2_vl/README.md (Tips)
    # sizes the prefill above them: N 5120 -> 1280 tokens -> a prefill over 1280 (2048 there)
    tokens = patches // VisionGeometry.from_config(config).merge ** 2
    limit = position_limit(config)
    prefill = round_up(tokens + prompt_tokens, ALIGN) if prefill is None else prefill
    if prefill % ALIGN or not tokens < prefill < limit:
        why = (f"cannot hold the image's {tokens} tokens (N = {patches}) and a prompt" if prefill <= tokens
               else f"is not a multiple of {ALIGN}" if prefill % ALIGN
               else f"leaves no room for an answer within {limit} positions (max_position_embeddings)")
        raise UserError(f"--prefill-len {prefill}: the prefill {prefill} {why}; give a multiple of {ALIGN} above "
                        f"{tokens} and below {limit}, e.g. {round_up(tokens + DEFAULT_PROMPT_TOKENS, ALIGN)}")
    if longest is None:
        longest = min(round_up(prefill + answer_tokens, ALIGN), limit // ALIGN * ALIGN)
    if longest % ALIGN or not prefill < longest <= limit:
        raise UserError(f"--max-len {longest}: the context must be longer than the prefill ({prefill}), at most "
                        f"{limit} (max_position_embeddings), and a multiple of {ALIGN}")
    return prefill, longest


def visual_output_split(hidden_size: int, chunk: int = OUTPUT_CHUNK) -> list[int]:
    """The column widths vamc splits a [tokens, hidden_size] visual output into: 3584 -> [640]*5 + [384]."""
    return [chunk] * (hidden_size // chunk) + ([hidden_size % chunk] if hidden_size % chunk else [])


def check_patches(config: dict, patches: int) -> None:
    """Refuse a visual compile size that is not a positive multiple of patch_multiple(config)."""
    multiple = patch_multiple(config)
    if patches < multiple or patches % multiple:
        below = max(multiple, patches // multiple * multiple)
        raise UserError(f"--patches {patches}: a visual N is a positive multiple of {multiple} (vamc's shapes are "
                        f"multiples of 16, of whole merge groups), e.g. {below} or {below + multiple}")
