"""The vision sequence-length arithmetic behind `vlhub plan`: what inputs become, and the compile sizes that hold them.

Qwen2-VL and Qwen2.5-VL resize every image with `smart_resize` to multiples of patch x merge (28 pixels),
within [min_pixels, max_pixels], cut it into 14-pixel patches (a grid t x h x w) and merge each 2x2 group of
patches into one language-model token. A video is its frames resized the same way, two frames
(temporal_patch_size) to a grid step. Qwen-VL (v1) resizes every image to 448x448: 1024 patches that its
resampler turns into 256 tokens.

Compile sizes are for one input per request (one image per ViT call, as vastgenx and the TPU demos run
it): the visual size N holds the largest input's patches, the prefill its tokens plus a prompt, the maximum
context the prefill plus an answer. vamc's LLM lengths are sized from N itself (`vamc_lengths`, which
`vlhub convert --to vamc` uses too). Sources: transformers' Qwen2-VL image processor and the official
preprocessor_config.json (resizing, bounds), VastModelZOO vlm/qwen2_vl/README.md and build_in/build/*.yaml
(multiples of 16, N x 14^2 pixels, 640-column outputs), TPU-MLIR python/tools/llm_convert.py (--max_pixels,
--seq_length).
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from vlhub.catalog import find_model, unknown_model_message
from vlhub.convert.configs import official_config
from vlhub.errors import UserError
from vlhub.families import FAMILIES, family_of_config
from vlhub.formats.readers import config_dtype, open_checkpoint
from vlhub.keymaps.config import text_config
from vlhub.smoke.inputs import MAX_PIXELS, MAX_RATIO, MIN_PIXELS, SMOKE_PATCHES, VisionGeometry, smart_resize
from vlhub.targets.tpu_mlir.build import TpuOptions, refuse_family, tpu_options

T = TypeVar("T")

ALIGN = 16  # vamc compiles sequence and patch dimensions in multiples of 16 (VastModelZOO llm/README.md)
DEFAULT_PROMPT_TOKENS = 128  # the chat template's turns and a question beside the visual tokens
DEFAULT_ANSWER_TOKENS = 512
OUTPUT_CHUNK = 640  # vamc splits the visual output into columns of at most 640 (vlm/qwen2_vl/README.md Tips)
TARGETS = ("vamc", "tpu-mlir", "paddle-inference")
ROUTES = {"qwen_vl": ("paddle-inference",), "qwen2_vl": TARGETS, "qwen2_5_vl": TARGETS}
ROUTES_TO_VAMC = tuple(family for family, targets in ROUTES.items() if "vamc" in targets)
# The visual network's attention_mask input is [1, N, N]: 128 MB of float16 at 8192; the published vamc builds
# use 4096 to 6144, and the 7-hour compile grows with N.
MAX_VAMC_PATCHES = 8192


@dataclass(frozen=True)
class InputPlan:
    """One image (frames None) or video as the processor prepares it."""

    width: int
    height: int
    frames: int | None
    resized: tuple[int, int]  # (height, width) after smart_resize
    grid: tuple[int, int, int]  # (t, h, w) in patches
    tokens: int  # language-model tokens it becomes

    @property
    def patches(self) -> int:
        """ViT input rows: t * h * w."""
        return math.prod(self.grid)

    @property
    def label(self) -> str:
        kind = "image" if self.frames is None else "video"
        return f"{kind} {self.width}x{self.height}" + ("" if self.frames is None else f", {self.frames} frames")

    def to_json(self) -> dict:
        return {"input": self.label, "kind": "image" if self.frames is None else "video", "width": self.width,
                "height": self.height, "frames": self.frames,
                "resized": {"height": self.resized[0], "width": self.resized[1]}, "grid": list(self.grid),
                "patches": self.patches, "tokens": self.tokens}


@dataclass(frozen=True)
class CompileSizes:
    """Sizes that hold every input, one per request."""

    visual_patches: int  # N: the ViT's input rows, a multiple of patch_multiple(config)
    prefill_length: int  # the largest input's tokens plus the prompt, a multiple of 16
    max_length: int  # prefill plus the answer, a multiple of 16
    position_limit: int  # the model's max_position_embeddings

    def to_json(self) -> dict:
        return {"visual_patches": self.visual_patches, "prefill_length": self.prefill_length,
                "max_length": self.max_length, "position_limit": self.position_limit}


@dataclass(frozen=True)
class VamcPlan:
    """The vamc compile numbers: the visual yaml's N and the LLM yaml's input_ids [[prefill], [max]]."""

    visual_patches: int  # N: --patches when given, else the computed size
    given: bool
    max_pixels: int  # the largest image N holds (vastgenx --max_pixels): N * patch**2
    prefill_length: int
    max_length: int
    output_split: tuple[int, ...]  # the visual output's column chunks (output_layout entries)

    def to_json(self) -> dict:
        return {"visual_patches": self.visual_patches, "given": self.given, "max_pixels": self.max_pixels,
                "input_ids": [[self.prefill_length], [self.max_length]], "output_split": list(self.output_split)}


@dataclass(frozen=True)
class Refit:
    """An input resized to fit a visual compile size: with the largest max_pixels that keeps it within."""

    max_pixels: int  # per frame for a video
    input: InputPlan

    def to_json(self) -> dict:
        return {"max_pixels": self.max_pixels, **self.input.to_json()}


@dataclass(frozen=True)
class Plan:
    """Everything `vlhub plan` reports; a target left out (or without a route) is None."""

    model: str
    family: str
    min_pixels: int | None  # None: Qwen-VL's fixed resize
    max_pixels: int | None
    prompt_tokens: int
    answer_tokens: int
    inputs: tuple[InputPlan, ...]
    sizes: CompileSizes
    fit_patches: int  # the visual size each input is checked against: --patches, else sizes.visual_patches
    refits: tuple[Refit | None, ...]  # per input: None when it fits fit_patches
    vamc: VamcPlan | None
    tpu_mlir: TpuOptions | None
    paddle_max_seq_len: int | None
    # targets the family has a route to that this model cannot take, each with why (only when no --target
    # was named: a named one that cannot take it is refused)
    unavailable: dict[str, str] = field(default_factory=dict)

    def command(self, target: str) -> str | None:
        """The `vlhub convert` command that builds the target's layout with these sizes (None: a vamc N past
        what vlhub builds)."""
        if target == "tpu-mlir" and self.tpu_mlir:
            width, height = self.tpu_mlir.max_pixels
            options = f"--seq-length {self.tpu_mlir.seq_length} --max-pixels {width},{height}"
        elif target == "vamc" and self.vamc:
            if self.vamc.visual_patches > MAX_VAMC_PATCHES:
                return None
            options = (f"--max-pixels {self.vamc.max_pixels} --prefill-len {self.vamc.prefill_length} "
                       f"--max-len {self.vamc.max_length}")
            if self.vamc.visual_patches < SMOKE_PATCHES:  # convert's smoke test pads the smoke image to N rows
                options += " --no-smoke"
        elif target == "paddle-inference" and self.paddle_max_seq_len is not None:
            options = f"--max-seq-len {self.paddle_max_seq_len}"
        else:
            raise ValueError(f"no {target} plan")
        return f"vlhub convert {shlex.quote(self.model)} --to {target} {options}"

    def to_json(self) -> dict:
        targets: dict[str, dict] = {}
        if self.vamc:
            targets["vamc"] = {**self.vamc.to_json(), "command": self.command("vamc")}
        if self.tpu_mlir:
            targets["tpu-mlir"] = {"max_pixels": list(self.tpu_mlir.max_pixels), "seq_length": self.tpu_mlir.seq_length,
                                   "vision_patches": self.tpu_mlir.vision_patches,
                                   "vision_tokens": self.tpu_mlir.vision_tokens, "command": self.command("tpu-mlir")}
        if self.paddle_max_seq_len is not None:
            targets["paddle-inference"] = {"max_seq_len": self.paddle_max_seq_len,
                                           "command": self.command("paddle-inference")}
        targets.update({name: {"unavailable": why} for name, why in self.unavailable.items()})
        inputs = [{**item.to_json(), "fits": fitted is None, "refit": fitted and fitted.to_json()}
                  for item, fitted in zip(self.inputs, self.refits)]
        return {"model": self.model, "family": self.family, "min_pixels": self.min_pixels,
                "max_pixels": self.max_pixels, "prompt_tokens": self.prompt_tokens,
                "answer_tokens": self.answer_tokens, "fit_patches": self.fit_patches, "inputs": inputs,
                "compile": self.sizes.to_json(), "targets": targets}


def model_config(model: str) -> dict:
    """The flat official config of MODEL: a local checkpoint's config.json, else the catalog's (nothing is
    downloaded)."""
    path = Path(model).expanduser()
    if path.exists():
        with open_checkpoint(path) as checkpoint:  # headers only
            config = checkpoint.config
        if not config:
            raise UserError(f"{path}: no config.json beside the weights; the plan reads the vision settings from it")
        return official_config(config)
    spec = find_model(model)
    if spec is not None:
        return official_config(spec.config)
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise UserError(f"no such file or directory: {model}")
    raise UserError(unknown_model_message(model))


def family_name(config: dict) -> str:
    """The family a config belongs to, refusing any other model type."""
    family = family_of_config(config)
    if family is None:
        raise UserError(f"model_type {config.get('model_type')!r} is not a Qwen-VL family model: vlhub plans "
                        f"{', '.join(f.model_type for f in FAMILIES.values())}")
    return family.name


def parse_size_pair(text: str, option: str = "--image") -> tuple[int, int]:
    """(width, height) from WIDTHxHEIGHT, e.g. 1280x720, both at least 1 pixel."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise UserError(f"{option} {text!r}: write WIDTHxHEIGHT in pixels, e.g. 1280x720") from None
    _check_size(width, height, option)
    return width, height


def _check_size(width: int, height: int, option: str) -> None:
    if width < 1 or height < 1:
        raise UserError(f"{option} {width}x{height}: width and height must be at least 1 pixel")


def patch_multiple(config: dict) -> int:
    """What a visual compile size must be a multiple of: 16, and whole merge groups."""
    if family_name(config) == "qwen_vl":
        return ALIGN
    return math.lcm(ALIGN, VisionGeometry.from_config(config).merge ** 2)


def pixel_bounds(config: dict, min_pixels: int | None, max_pixels: int | None) -> tuple[int, int] | None:
    """The checked [min_pixels, max_pixels] (default: the official processor's), None for Qwen-VL."""
    if family_name(config) == "qwen_vl":
        if min_pixels is not None or max_pixels is not None:
            raise UserError("Qwen-VL resizes every image to 448x448: --min-pixels and --max-pixels do not apply")
        return None
    geometry = VisionGeometry.from_config(config)
    smallest = (geometry.patch * geometry.merge) ** 2  # one merged token
    low = MIN_PIXELS if min_pixels is None else min_pixels
    high = MAX_PIXELS if max_pixels is None else max_pixels
    if high < smallest:
        raise UserError(f"--max-pixels {high}: at least {smallest} (one {geometry.patch * geometry.merge}-pixel "
                        f"square), e.g. {MAX_PIXELS} (the processor's default)")
    if not 1 <= low <= high:
        raise UserError(f"--min-pixels {low}: from 1 to --max-pixels ({high}); the processor's default is "
                        f"{MIN_PIXELS}")
    return low, high


def plan_inputs(config: dict, images: Sequence[tuple[int, int]] = (), video: tuple[int, int, int] | None = None, *,
                min_pixels: int | None = None, max_pixels: int | None = None) -> list[InputPlan]:
    """Each image (width, height), then the video (width, height, frames), as the model's processor prepares
    it. Video frames are resized with the same smart_resize and the same bounds as images (the processor's
    own video bounds are smaller: give them with min_pixels / max_pixels); grid t is frames / temporal
    patch, rounded up."""
    if not images and video is None:
        raise UserError("nothing to plan: give --image WIDTHxHEIGHT (e.g. 1280x720) or --video WxH --frames F")
    bounds = pixel_bounds(config, min_pixels, max_pixels)
    sizes = [(w, h, None) for w, h in images] + ([video] if video else [])
    for width, height, frames in sizes:
        option = "--image" if frames is None else "--video"
        _check_size(width, height, option)
        if frames is not None and frames < 1:
            raise UserError(f"--frames {frames}: a video needs at least 1 frame")
        ratio = max(width, height) / min(width, height)
        if bounds is not None and ratio > MAX_RATIO:
            raise UserError(f"{option} {width}x{height}: the processor takes aspect ratios up to {MAX_RATIO}:1, "
                            f"this one is {ratio:.0f}:1")
    if bounds is None:
        return _qwen_vl_inputs(config, images, video)
    return [_resized(config, w, h, frames, *bounds) for w, h, frames in sizes]


def _resized(config: dict, width: int, height: int, frames: int | None, min_pixels: int, max_pixels: int) -> InputPlan:
    geometry = VisionGeometry.from_config(config)
    resized = smart_resize(height, width, factor=geometry.patch * geometry.merge, min_pixels=min_pixels,
                           max_pixels=max_pixels)
    grid_t = 1 if frames is None else math.ceil(frames / geometry.temporal_patch)
    grid = (grid_t, resized[0] // geometry.patch, resized[1] // geometry.patch)
    return InputPlan(width, height, frames, resized, grid, math.prod(grid) // geometry.merge ** 2)


def _qwen_vl_inputs(config: dict, images: Sequence[tuple[int, int]],
                    video: tuple[int, int, int] | None) -> list[InputPlan]:
    if video is not None:
        raise UserError("Qwen-VL takes images only: drop --video")
    visual = config["visual"]
    side = visual.get("image_size", 448)
    grid = (1, side // visual["patch_size"], side // visual["patch_size"])
    tokens = int(FAMILIES["qwen_vl"].keymap.resolve_dims(config)["queries"])  # the resampler's fixed output
    return [InputPlan(w, h, None, (side, side), grid, tokens) for w, h in images]


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def position_limit(config: dict) -> int:
    """The positions the model takes: its max_position_embeddings (32768, transformers' default, when absent)."""
    return int(text_config(config).get("max_position_embeddings") or 32768)


def check_max_seq_len(family: str, config: dict, max_seq_len: int, fix: str = "--max-seq-len") -> None:
    """Refuse a Paddle Inference max_seq_len the static graphs cannot run (`fix` names what to lower): Qwen-VL's
    at most its seq_length, past which the model scales its rotary (dynamic NTK) and a static graph does not;
    the others' at most max_position_embeddings. `vlhub plan` and `vlhub convert --to paddle-inference` both
    check it here."""
    if max_seq_len < 1:
        raise UserError("--max-seq-len must be positive")
    qwen_vl = family == "qwen_vl"
    limit = int(config.get("seq_length") or 2048) if qwen_vl else position_limit(config)
    if max_seq_len > limit:
        said = "Qwen-VL's seq_length" if qwen_vl else "the model's max_position_embeddings"
        why = ", beyond which it scales its rotary (dynamic NTK) and the static graph does not" if qwen_vl else ""
        raise UserError(f"{max_seq_len} positions pass {said} {limit}{why}; lower {fix}")


def compile_sizes(config: dict, inputs: Sequence[InputPlan], prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
                  answer_tokens: int = DEFAULT_ANSWER_TOKENS) -> CompileSizes:
    """The smallest sizes that hold every input, one per request, within max_position_embeddings."""
    if prompt_tokens < 1:
        raise UserError(f"--prompt-tokens {prompt_tokens}: 1 or more (the visual tokens always come with text: the "
                        "chat template's turns and the question)")
    if answer_tokens < 1:
        raise UserError(f"--answer-tokens {answer_tokens}: 1 or more")
    largest = max(inputs, key=lambda item: item.tokens)
    tokens, patches, what = largest.tokens, max(item.patches for item in inputs), f"the {largest.label}"
    prefill = round_up(tokens + prompt_tokens, ALIGN)
    longest = round_up(prefill + answer_tokens, ALIGN)
    limit = position_limit(config)
    if longest > limit:
        raise UserError(f"{what} is {tokens} tokens: with {prompt_tokens} prompt and {answer_tokens} answer tokens "
                        f"it needs {longest} positions, more than the model's {limit} (max_position_embeddings); "
                        "lower --max-pixels or the token counts")
    return CompileSizes(round_up(patches, patch_multiple(config)), prefill, longest, limit)


def vamc_lengths(config: dict, patches: int, *, prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
                 answer_tokens: int = DEFAULT_ANSWER_TOKENS, prefill: int | None = None,
                 longest: int | None = None) -> tuple[int, int]:
    """The vamc LLM's (prefill, context) for a visual N of `patches`: a given one checked, else N's visual
    tokens plus `prompt_tokens`, and the prefill plus `answer_tokens` (at most max_position_embeddings), both
    rounded up to 16. `vlhub plan` and `vlhub convert --to vamc` (its defaults, its checks, `vamc_problems`)
    all size them here, so a command plan prints is one convert accepts."""
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


def max_pixels_for(config: dict, patches: int) -> int:
    """The largest image (in pixels) a visual compile size of `patches` holds: patches * patch_size**2."""
    return patches * VisionGeometry.from_config(config).patch ** 2


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


def refuse_target(family: str, target: str) -> None:
    """Refuse a target vlhub does not know, or one the family has no route to."""
    if target not in TARGETS:
        raise UserError(f"--target {target!r}: choose {', '.join(TARGETS)}")
    if target == "tpu-mlir":
        refuse_family(family)
    elif target == "vamc" and family not in ROUTES_TO_VAMC:
        if family == "qwen_vl":
            raise UserError("Qwen-VL (v1) has no vamc route: VastModelZOO's vamc recipes and vacc modeling cover "
                            "Qwen2-VL and Qwen2.5-VL only (its vlm/qwen2_vl and vlm/qwen2_5_vl); use a Qwen2-VL or "
                            "Qwen2.5-VL model")
        raise UserError(f"--to vamc supports {', '.join(ROUTES_TO_VAMC)}, not {family}")


def refit(config: dict, item: InputPlan, patches: int, min_pixels: int) -> Refit:
    """`item` resized with the max_pixels `patches` allows (per frame: patches // t for a video)."""
    budget = max_pixels_for(config, patches // item.grid[0])
    return Refit(budget, _resized(config, item.width, item.height, item.frames, min(min_pixels, budget), budget))


def paddle_max_seq_len(config: dict, sizes: CompileSizes) -> int:
    """Paddle Inference's max_seq_len (prompt plus answer), checked as `vlhub convert --to paddle-inference`
    checks it."""
    check_max_seq_len(family_name(config), config, sizes.max_length, "--prompt-tokens or --answer-tokens")
    return sizes.max_length


def tpu_mlir_options(config: dict, inputs: Sequence[InputPlan], sizes: CompileSizes) -> TpuOptions:
    """llm_convert's --max_pixels W,H and --seq-length for these inputs, checked as `vlhub convert --to tpu-mlir`
    checks them. W,H is the largest input's resized size; a video, or a side under 56 pixels, gets a near-square
    budget of as many 28-pixel squares."""
    largest = max(inputs, key=lambda item: item.patches)
    height, width = largest.resized
    geometry = VisionGeometry.from_config(config)
    factor = geometry.patch * geometry.merge
    if largest.frames is not None or min(height, width) < 2 * factor:
        squares = largest.patches // geometry.merge ** 2
        across = max(2, math.isqrt(squares - 1) + 1)
        width, height = across * factor, max(2, -(-squares // across)) * factor
    return tpu_options(family_name(config), config, config_dtype(config) or "bfloat16",
                       seq_length=sizes.max_length, max_pixels=f"{width},{height}")


def make_plan(model: str, *, images: Sequence[tuple[int, int]] = (), video: tuple[int, int, int] | None = None,
              min_pixels: int | None = None, max_pixels: int | None = None, patches: int | None = None,
              prompt_tokens: int = DEFAULT_PROMPT_TOKENS, answer_tokens: int = DEFAULT_ANSWER_TOKENS,
              target: str | None = None) -> Plan:
    """The plan for MODEL (see `model_config`): `target` alone, or every target the family has a route to.
    `patches` (vamc only) is a given visual compile size to check each input against."""
    config = model_config(model)
    family = family_name(config)
    if target is not None:
        refuse_target(family, target)
    targets = (target,) if target else ROUTES[family]
    if patches is not None:
        if "vamc" not in targets:
            why = "Qwen-VL (v1) has no vamc route" if family == "qwen_vl" else "use it with --target vamc"
            raise UserError(f"--patches is a vamc visual compile size: {why}")
        check_patches(config, patches)
    bounds = pixel_bounds(config, min_pixels, max_pixels)
    inputs = plan_inputs(config, images, video, min_pixels=min_pixels, max_pixels=max_pixels)
    sizes = compile_sizes(config, inputs, prompt_tokens, answer_tokens)
    fit = sizes.visual_patches if patches is None else patches
    # without --patches every input fits by construction; Qwen-VL (no vamc route) never gets here with one
    refits = tuple(None if item.patches <= fit else refit(config, item, fit, bounds[0]) for item in inputs)
    unavailable: dict[str, str] = {}

    def for_target(name: str, build: Callable[[], T]) -> T | None:
        """The target's part of the plan; without --target, a target this model cannot take is noted, not fatal."""
        if name not in targets:
            return None
        try:
            return build()
        except UserError as exc:
            if target is not None:
                raise
            unavailable[name] = str(exc)
            return None

    def vamc_plan() -> VamcPlan:
        lengths = vamc_lengths(config, fit, prompt_tokens=prompt_tokens, answer_tokens=answer_tokens)
        return VamcPlan(fit, patches is not None, max_pixels_for(config, fit), *lengths,
                        tuple(visual_output_split(text_config(config)["hidden_size"])))

    plan = Plan(model, family, *(bounds or (None, None)), prompt_tokens, answer_tokens, tuple(inputs), sizes, fit,
                refits, for_target("vamc", vamc_plan),
                for_target("tpu-mlir", lambda: tpu_mlir_options(config, inputs, sizes)),
                for_target("paddle-inference", lambda: paddle_max_seq_len(config, sizes)), unavailable)
    if len(unavailable) == len(targets):  # no route is left: the first reason is the answer
        raise UserError(next(iter(unavailable.values())))
    return plan
