"""The vision sequence-length arithmetic: what images and videos become, and the compile sizes that hold them.

A family whose processor resizes smartly (`[vision] resize = "smart"`: Qwen2-VL, Qwen2.5-VL, Qwen3-VL) resizes every
image with `smart_resize` to multiples of patch x merge (28 pixels; 32 for Qwen3-VL's 16-pixel patches), within
[min_pixels, max_pixels] (the checkpoint's preprocessor_config.json, else its family's published one), cuts it into
patches (a grid t x h x w) and merges each 2x2 group of patches into one language-model token. A video is its frames
resized the same way, two frames (temporal_patch_size) to a grid step. A family that resizes to a fixed
size (`resize = "fixed"`: Qwen-VL) makes every image the config's image_size square, a fixed number of tokens.

Sizes are written as users type them, WIDTHxHEIGHT, width first (1280x720 is a 720p landscape image); every
command prints them so (input and resized alike). Vendor documents that write 720x1280 (VastModelZOO) put the
height first: typed here, that is a 720-wide portrait image. A pixel count is an option named so (`--max-pixels N`
of `plan` and `--to vamc`); llm_convert's `--max_pixels W,H` is its own spelling, which `--to tpu-mlir` writes
into compile.sh from the WxH it is given.

Compile sizes are for one input per request (one image per ViT call, as vastgenx and the TPU demos run it): the
visual size N holds the largest input's patches, the prefill its tokens plus a prompt, the maximum context the
prefill plus an answer. Each deployment target sizes its own options from these (`Sizing`). Sources:
transformers' Qwen2-VL image processor and the official preprocessor_config.json (resizing, bounds).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from vlhub.errors import Note, UserError
from vlhub.family_registry import FAMILIES, Family, family_of_config
from vlhub.keymaps.config import text_config
from vlhub.smoke.inputs import MAX_RATIO, VisionGeometry, image_processing, smart_resize
from vlhub.units import plural

# compile shapes are multiples of 16 (vamc's rule, VastModelZOO llm/README.md; every target's sizes are held to it)
ALIGN = 16
DEFAULT_PROMPT_TOKENS = 128  # the chat template's turns and a question beside the visual tokens
DEFAULT_ANSWER_TOKENS = 512
# the largest side an image size may give: a JPEG's (and far beyond what a processor keeps); a pixel count, its square
MAX_SIDE = 65535
MAX_PIXEL_COUNT = MAX_SIDE * MAX_SIDE


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
    def resized_size(self) -> str:
        """The resized size as vlhub writes sizes: WIDTHxHEIGHT."""
        return f"{self.resized[1]}x{self.resized[0]}"

    @property
    def label(self) -> str:
        kind = "image" if self.frames is None else "video"
        frames = "" if self.frames is None else f", {plural(self.frames, 'frame')}"
        return f"{kind} {self.width}x{self.height}{frames}"

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
class Sizing:
    """What `vlhub plan` found for a model, from which each target sizes its own options."""

    model: str  # as the user named it (what the target's convert command names)
    family: Family
    config: dict  # flat official
    inputs: tuple[InputPlan, ...]
    sizes: CompileSizes
    fit_patches: int  # the visual size each input is checked against: --patches, else sizes.visual_patches
    patches_given: bool  # whether fit_patches is the user's --patches
    prompt_tokens: int
    answer_tokens: int


def config_family(config: dict) -> Family:
    """The family a config belongs to, refusing any other model type."""
    family = family_of_config(config)
    if family is None:
        raise UserError(f"model_type {config.get('model_type')!r} is not a Qwen-VL family model: vlhub plans "
                        f"{', '.join(f.model_type for f in FAMILIES.values())}")
    return family


def parse_size_pair(text: str, option: str = "--image", *, comma_spelling: str | None = None) -> tuple[int, int]:
    """(width, height) from WIDTHxHEIGHT, e.g. 1280x720, each side from 1 to MAX_SIDE pixels. With
    `comma_spelling` (the tool that writes sizes W,H), W,H is read too, with a `Note` that vlhub writes WxH."""
    comma = comma_spelling is not None and "," in text and "x" not in text.lower()
    try:
        width, height = (int(part) for part in text.lower().split("," if comma else "x"))
    except ValueError:
        raise UserError(f"{option} {text!r}: write WIDTHxHEIGHT in pixels, width first, e.g. 1280x720") from None
    _check_size(width, height, option)
    if comma:
        warnings.warn(f"{option} {text}: {comma_spelling}'s spelling, read as width,height; vlhub writes sizes WxH: "
                      f"{option} {width}x{height}", Note, stacklevel=2)
    return width, height


def _check_size(width: int, height: int, option: str) -> None:
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise UserError(f"{option} {width}x{height}: width and height must be from 1 to {MAX_SIDE} pixels, "
                        "e.g. 1280x720")


def check_pixel_count(value: int, option: str = "--max-pixels") -> int:
    """A pixel count a user gave: from 1 to MAX_PIXEL_COUNT (a MAX_SIDE square)."""
    if not 1 <= value <= MAX_PIXEL_COUNT:
        raise UserError(f"{option} {value}: a pixel count from 1 to {MAX_PIXEL_COUNT} ({MAX_SIDE}x{MAX_SIDE}), "
                        "e.g. 921600 (1280x720)")
    return value


def parse_pixel_count(text: str, option: str, what: str, example: int, *, or_image: bool = False) -> int:
    """A pixel count typed for `option` (921600, or with thousands separators: 921_600, 1,003,520), checked by
    `check_pixel_count`. A size typed instead (1280x720, or llm_convert's 1280,720) is answered in one line with its
    pixel count (`what` names the count: "the processor's max_pixels, the largest image's"), and with
    `or_image` with the --image that gives that size. One comma before three digits (921,600) reads either way,
    a count or llm_convert's size: answered in one line with both."""
    digits = text.strip().replace("_", "")
    if re.fullmatch(r"\d{1,3},\d{3}", digits):
        width, height = (int(side) for side in digits.split(","))
        count = int(digits.replace(",", ""))
        raise UserError(f"{option} {text} reads two ways: {count} pixels, or llm_convert's {width},{height} "
                        f"({width * height} pixels): write {option} {count} or {option} {width * height}")
    if re.fullmatch(r"\d{1,3}(,\d{3}){2,}", digits):
        digits = digits.replace(",", "")
    if re.fullmatch(r"[0-9]+", digits):
        return check_pixel_count(int(digits), option)
    if re.fullmatch(r"\s*\d+\s*[x,]\s*\d+\s*", text.lower()):
        width, height = parse_size_pair(text.lower().replace(",", "x"), option)
        raise UserError(f"{option} {text}: {what} pixel count, e.g. {option} {width * height} ({width}x{height})"
                        + (f", or --image {width}x{height}" if or_image else ""))
    raise UserError(f"{option} {text!r}: {what} pixel count, e.g. {option} {example}")


def _fixed_size(family: Family) -> bool:
    return family.vision.resize == "fixed"


def patch_multiple(config: dict) -> int:
    """What a visual compile size must be a multiple of: 16, and whole merge groups."""
    if _fixed_size(config_family(config)):
        return ALIGN
    return math.lcm(ALIGN, VisionGeometry.from_config(config).merge ** 2)


def pixel_bounds(config: dict, min_pixels: int | None, max_pixels: int | None,
                 preprocessor: dict | None = None) -> tuple[int, int] | None:
    """The checked [min_pixels, max_pixels] (default: the checkpoint's `preprocessor` config, else its family's
    published one), None for a fixed-size family."""
    family = config_family(config)
    if _fixed_size(family):
        if min_pixels is not None or max_pixels is not None:
            side = _fixed_side(config)
            raise UserError(f"{family.display_name} resizes every image to {side}x{side}: --min-pixels and "
                            "--max-pixels do not apply")
        return None
    geometry = VisionGeometry.from_config(config)
    smallest = (geometry.patch * geometry.merge) ** 2  # one merged token
    default = image_processing(config, preprocessor)
    low = default.min_pixels if min_pixels is None else check_pixel_count(min_pixels, "--min-pixels")
    high = default.max_pixels if max_pixels is None else check_pixel_count(max_pixels)
    if high < smallest:
        raise UserError(f"--max-pixels {high}: at least {smallest} (one {geometry.patch * geometry.merge}-pixel "
                        f"square), e.g. {default.max_pixels} (the processor's default)")
    if not 1 <= low <= high:
        raise UserError(f"--min-pixels {low}: from 1 to --max-pixels ({high}); the processor's default is "
                        f"{default.min_pixels}")
    return low, high


def plan_inputs(config: dict, images: Sequence[tuple[int, int]] = (), video: tuple[int, int, int] | None = None, *,
                min_pixels: int | None = None, max_pixels: int | None = None,
                preprocessor: dict | None = None) -> list[InputPlan]:
    """Each image (width, height), then the video (width, height, frames), as the model's processor prepares
    it. Video frames are resized with the same smart_resize and the same bounds as images (the processor's
    own video bounds are smaller: give them with min_pixels / max_pixels); grid t is frames / temporal
    patch, rounded up."""
    if not images and video is None:
        raise UserError("nothing to plan: give --image WIDTHxHEIGHT (e.g. 1280x720) or --video WxH --frames F")
    bounds = pixel_bounds(config, min_pixels, max_pixels, preprocessor)
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
        return _fixed_inputs(config, images, video)
    return [resize_input(config, w, h, frames, *bounds) for w, h, frames in sizes]


def resize_input(config: dict, width: int, height: int, frames: int | None, min_pixels: int,
                 max_pixels: int) -> InputPlan:
    """One image (frames None) or video resized with smart_resize within [min_pixels, max_pixels]."""
    geometry = VisionGeometry.from_config(config)
    resized = smart_resize(height, width, factor=geometry.patch * geometry.merge, min_pixels=min_pixels,
                           max_pixels=max_pixels)
    grid_t = 1 if frames is None else math.ceil(frames / geometry.temporal_patch)
    grid = (grid_t, resized[0] // geometry.patch, resized[1] // geometry.patch)
    return InputPlan(width, height, frames, resized, grid, math.prod(grid) // geometry.merge ** 2)


def _fixed_side(config: dict) -> int:
    return int(config["visual"].get("image_size", 448))


def _fixed_inputs(config: dict, images: Sequence[tuple[int, int]],
                  video: tuple[int, int, int] | None) -> list[InputPlan]:
    family = config_family(config)
    if video is not None and not family.vision.video:
        raise UserError(f"{family.display_name} takes images only: drop --video")
    side = _fixed_side(config)
    grid = (1, side // config["visual"]["patch_size"], side // config["visual"]["patch_size"])
    assert family.vision.image_tokens is not None  # a fixed-size family names the dim its tokens are
    tokens = int(family.keymap.resolve_dims(config)[family.vision.image_tokens])
    return [InputPlan(w, h, None, (side, side), grid, tokens) for w, h in images]


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def position_limit(config: dict) -> int:
    """The positions the model takes: its max_position_embeddings (32768, transformers' default, when absent)."""
    return int(text_config(config).get("max_position_embeddings") or 32768)


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


def max_pixels_for(config: dict, patches: int) -> int:
    """The largest image (in pixels) a visual compile size of `patches` holds: patches * patch_size**2."""
    return patches * VisionGeometry.from_config(config).patch ** 2
