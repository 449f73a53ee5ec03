"""The smoke input: a deterministic synthetic image and a prompt, prepared as each family's model wants.

Everything a forward needs besides weights is computed here, on the host, once: patches in the
processor's order, vision rotary positions, attention masks and window order (Qwen2.5-VL), and the
text M-RoPE positions. Both the numpy reference and the Paddle forward consume the same arrays.
Facts: docs/facts/qwen-keys.md#patch-order, #smart-resize, #mrope.
"""

from __future__ import annotations

import json
import math
import reprlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlhub.errors import CorruptCheckpoint, UserError
from vlhub.family_registry import family_of_config
from vlhub.keymaps.config import text_config

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
# the official preprocessor_config.json bounds (docs/facts/qwen-keys.md#preprocessor-defaults)
PREPROCESSOR_CONFIG = "preprocessor_config.json"
MIN_PIXELS = 56 * 56
MAX_PIXELS = 16384 * 28 * 28
MAX_RATIO = 200
# the most pixels a preprocessor_config.json may make the smallest image (min_pixels): 4096 16-pixel patches, where
# released files say 3136 (Qwen2-VL) and 65536 (Qwen3-VL)
MAX_SMOKE_MIN_PIXELS = 1 << 20
# the smoke image: 8 x 12 patches, 24 visual tokens; for Qwen2.5-VL two 112-pixel windows wide, the
# second one partial, so window attention and its padding are exercised
SMOKE_IMAGE = (112, 168)
SMOKE_PATCHES = (SMOKE_IMAGE[0] // 14) * (SMOKE_IMAGE[1] // 14)  # the vision rows it becomes: 96
# The prompt's ordinary text: official Qwen2 ids of "user \n" before the image, "Describe this image ." after
# it, then "\n" and "assistant \n" (Qwen-VL: "Picture 1:" before, the same question after). A smaller
# vocabulary gets them folded into its range, clear of every special id (see `PromptTokens`): the
# comparison needs ids the embedding holds, not words.
USER_IDS = (872, 198)
QUESTION_IDS = (74785, 419, 2168, 13)
NEWLINE_IDS = (198,)
ASSISTANT_IDS = (77091, 198)
PICTURE_IDS = (24669, 220, 16, 25)  # "Picture 1:", the prompt before an image in Qwen's first chat format
# the chat markers, by the name the tokenizer files give them (their ids are the checkpoint's own)
CHAT_START, CHAT_END = "<|im_start|>", "<|im_end|>"
# where the Qwen2(.5)-VL config names the ids of its image placeholders
_VISION_TOKEN_KEYS = ("image_token_id", "vision_start_token_id", "vision_end_token_id")
_TOKEN_NAMES = {"image_token_id": "<|image_pad|>", "vision_start_token_id": "<|vision_start|>",
                "vision_end_token_id": "<|vision_end|>"}
# what the device runtimes (LLM-TPU, the exported ONNX networks) add where attention is masked: bf16-safe
DEVICE_MASKED = np.float32(-10000.0)
MASKED = np.float32(-1e30)  # additive mask value: large and finite, so a fully masked row cannot make NaN


def smart_resize(height: int, width: int, *, factor: int = 28, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """The size Qwen2-VL / Qwen2.5-VL processors resize an image to: multiples of `factor`, within the pixel bounds."""
    if min(height, width) < 1:
        raise UserError(f"image size {height}x{width} is empty")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise UserError(f"image {height}x{width} is more than {MAX_RATIO} times as long as wide; the processor refuses it")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def synthetic_image(height: int, width: int) -> np.ndarray:
    """A deterministic RGB image (uint8 [height, width, 3]): smooth gradients plus a checkerboard."""
    rows = np.arange(height, dtype=np.float32)[:, None]
    cols = np.arange(width, dtype=np.float32)[None, :]
    red = 255 * rows / max(height - 1, 1) + 0 * cols
    green = 255 * cols / max(width - 1, 1) + 0 * rows
    blue = 255 * (((rows // 14) + (cols // 14)) % 2) * 0.75 + 32 * np.sin(rows / 9 + cols / 13)
    return np.clip(np.stack([red, green, blue], axis=-1), 0, 255).round().astype(np.uint8)


def normalize(image: np.ndarray, mean: np.ndarray = CLIP_MEAN, std: np.ndarray = CLIP_STD) -> np.ndarray:
    """uint8 [H, W, 3] to normalised float32 [3, H, W] (CLIP's mean and std unless given)."""
    scaled = image.astype(np.float32) * np.float32(1 / 255)
    return ((scaled - mean) / std).transpose(2, 0, 1)


@dataclass(frozen=True)
class ImageProcessing:
    """What the image processor does before cutting patches: smart_resize to multiples of `factor` within
    [min_pixels, max_pixels], then (x / 255 - mean) / std. The defaults are Qwen2(.5)-VL's."""

    factor: int = 28
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    mean: np.ndarray = field(default_factory=lambda: CLIP_MEAN)
    std: np.ndarray = field(default_factory=lambda: CLIP_STD)

    @classmethod
    def from_preprocessor(cls, preprocessor: dict, fallback: ImageProcessing) -> ImageProcessing:
        """The values a checkpoint's preprocessor_config.json gives, `fallback`'s where it is silent. As
        transformers' Qwen2-VL image processor reads them: `size.shortest_edge` / `size.longest_edge` are the
        pixel bounds, the older top-level `min_pixels` / `max_pixels` override them; the factor is
        `patch_size` x `merge_size`."""
        size = preprocessor.get("size") if isinstance(preprocessor.get("size"), dict) else {}
        low = preprocessor.get("min_pixels", size.get("shortest_edge", fallback.min_pixels))
        high = preprocessor.get("max_pixels", size.get("longest_edge", fallback.max_pixels))
        patch, merge = preprocessor.get("patch_size"), preprocessor.get("merge_size")
        factor = patch * merge if _positive(patch) and _positive(merge) else fallback.factor
        for name, value in (("min_pixels (size.shortest_edge)", low), ("max_pixels (size.longest_edge)", high)):
            if not _positive(value):
                raise UserError(f"preprocessor_config.json {name} is {reprlib.repr(value)}: vlhub needs a positive "
                                "integer; fix preprocessor_config.json (or convert with --no-smoke)")
        if low > high:
            raise UserError(f"preprocessor_config.json gives min_pixels {low} above max_pixels {high}; fix "
                            "preprocessor_config.json (or convert with --no-smoke)")
        return cls(factor, low, high, _channels(preprocessor, "image_mean", fallback.mean),
                   _channels(preprocessor, "image_std", fallback.std))


def _positive(value: object) -> bool:
    return type(value) is int and value > 0


def _channels(preprocessor: dict, key: str, fallback: np.ndarray) -> np.ndarray:
    value = preprocessor.get(key)
    if value is None:
        return fallback
    if (not isinstance(value, list) or len(value) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            or (key == "image_std" and not all(v > 0 for v in value))):
        raise UserError(f"preprocessor_config.json {key} is {reprlib.repr(value)}: the smoke test needs three numbers"
                        f"{' above 0' if key == 'image_std' else ''}; fix preprocessor_config.json, or convert with "
                        "--no-smoke")
    return np.array(value, dtype=np.float32)


def preprocessor_config(directory: Path) -> dict:
    """The checkpoint's preprocessor_config.json in `directory` (empty when there is none)."""
    path = directory / PREPROCESSOR_CONFIG
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        raise CorruptCheckpoint(f"{path}: not a JSON object vlhub can read; fix or remove it")
    return data


@dataclass(frozen=True)
class VisionGeometry:
    """The vision config numbers the input preparation needs."""

    patch: int
    temporal_patch: int
    merge: int

    @classmethod
    def from_config(cls, config: dict) -> VisionGeometry:
        """From config.json, with its family's defaults (transformers') for what it leaves out."""
        vision = config.get("vision_config") or {}
        family = family_of_config(config)
        dims = family.keymap.dims if family is not None else {}

        def default(dim: str, fallback: int) -> int:
            return dims.get(dim, {}).get("default", fallback)

        return cls(vision.get("patch_size", vision.get("spatial_patch_size", default("v_patch", 14))),
                   vision.get("temporal_patch_size", default("v_temporal", 2)),
                   vision.get("spatial_merge_size", default("v_merge", 2)))


def patchify(pixels: np.ndarray, geometry: VisionGeometry) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A normalised [3, H, W] image as the processor's patch rows [t*h*w, 3*T*P*P] and its grid (t, h, w).

    Patches come in 2x2 merge-group order and each is flattened (channel, time, row, column); a still
    image is repeated along time.
    """
    p, t, m = geometry.patch, geometry.temporal_patch, geometry.merge
    channels, height, width = pixels.shape
    grid_h, grid_w = height // p, width // p
    frames = np.repeat(pixels[None], t, axis=0)  # [T, C, H, W]
    patches = frames.reshape(1, t, channels, grid_h // m, m, p, grid_w // m, m, p)
    # (grid_t, T, C, gh/m, m, P, gw/m, m, P) -> (grid_t, gh/m, gw/m, m, m, C, T, P, P)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(patches.reshape(grid_h * grid_w, channels * t * p * p)), (1, grid_h, grid_w)


def vision_position_ids(grids: list[tuple[int, int, int]], merge: int) -> np.ndarray:
    """Row and column of every patch ([N, 2] int64), in merge-group order, for the 2-D vision rotary."""
    out = []
    for t, h, w in grids:
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        cols = cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([rows, cols], axis=-1), (t, 1)))
    return np.concatenate(out).astype(np.int64)


def segment_mask(lengths: list[int]) -> np.ndarray:
    """An additive [N, N] mask that lets each token see only its own segment (one image frame or window)."""
    total = sum(lengths)
    mask = np.full((total, total), MASKED, dtype=np.float32)
    start = 0
    for length in lengths:
        mask[start:start + length, start:start + length] = 0
        start += length
    return mask


def window_order(grids: list[tuple[int, int, int]], geometry: VisionGeometry,
                 window_size: int) -> tuple[np.ndarray, list[int]]:
    """Window attention over `window_size`-pixel windows: the merge-group order that puts each window's groups
    together, and the patch count of every window in that order."""
    side = window_size // geometry.merge // geometry.patch  # window side in merged units
    unit = geometry.merge ** 2
    order, lengths, offset = [], [], 0
    for t, h, w in grids:
        gh, gw = h // geometry.merge, w // geometry.merge
        index = np.arange(t * gh * gw).reshape(t, gh, gw)
        for frame in range(t):
            for top in range(0, gh, side):
                for left in range(0, gw, side):
                    window = index[frame, top:top + side, left:left + side].reshape(-1)
                    order.append(window + offset)
                    lengths.append(window.size * unit)
        offset += t * gh * gw
    return np.concatenate(order).astype(np.int64), lengths


@dataclass
class VisionInputs:
    """What a merged-patch vision tower (Qwen2-VL's and its successors') takes besides its weights."""

    pixel_values: np.ndarray  # [N, 3*T*P*P] float32
    grids: list[tuple[int, int, int]]
    position_ids: np.ndarray  # [N, 2] int64
    full_mask: np.ndarray  # [N, N] float32, one segment per image frame
    window_index: np.ndarray | None = None  # [N / merge^2] int64 (a tower with window attention)
    reverse_index: np.ndarray | None = None
    window_mask: np.ndarray | None = None  # [N, N] in window order
    # a tower with a learned position table resampled to each grid: 4 taps of the table per patch (`bilinear_taps`)
    interp_indices: np.ndarray | None = None  # [N, 4] int64 rows of the table
    interp_weights: np.ndarray | None = None  # [N, 4] float32, summing to 1 per patch

    def as_kwargs(self) -> dict[str, np.ndarray]:
        """The arrays by the names the forwards take."""
        names = ("position_ids", "full_mask", "window_index", "reverse_index", "window_mask", "interp_indices",
                 "interp_weights")
        kwargs = {"vision_" + n if n == "position_ids" else n: getattr(self, n) for n in names}
        return {k: v for k, v in kwargs.items() if v is not None}


def vision_inputs(images: list[np.ndarray], config: dict, window_size: int | None = None) -> VisionInputs:
    """Patches and the host-side tables of the vision tower for normalised [3, H, W] images, with the window
    order and mask of `window_size`-pixel windows when the tower attends within windows."""
    geometry = VisionGeometry.from_config(config)
    pieces = [patchify(image, geometry) for image in images]
    grids = [grid for _, grid in pieces]
    inputs = VisionInputs(
        np.concatenate([patches for patches, _ in pieces]), grids,
        vision_position_ids(grids, geometry.merge),
        segment_mask([h * w for t, h, w in grids for _ in range(t)]),
    )
    if window_size is not None:
        order, lengths = window_order(grids, geometry, window_size)
        inputs.window_index, inputs.reverse_index = order, np.argsort(order).astype(np.int64)
        inputs.window_mask = segment_mask(lengths)
    return inputs


def bilinear_taps(grids: list[tuple[int, int, int]], side: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """A learned [side * side, C] position table bilinearly resampled to each grid (align_corners=True: the corner
    patches take the corner rows), as 4 taps per patch in merge-group order, repeated over the grid's frames:
    indices [N, 4] int64 into the table and weights [N, 4] float32, so that patch n's embedding is
    sum_k weights[n, k] * table[indices[n, k]]. transformers computes the same
    (`vision_utils.get_vision_interpolation_indices_and_weights`, mode "bilinear")."""
    indices, weights = [], []
    for t, h, w in grids:
        rows, cols = vision_position_ids([(1, h, w)], merge).T
        row_taps, row_weights = _linear_taps(rows, h, side)
        col_taps, col_weights = _linear_taps(cols, w, side)
        taps = (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4)
        tap_weights = (row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 4)
        indices.append(np.tile(taps, (t, 1)))
        weights.append(np.tile(tap_weights, (t, 1)))
    return np.concatenate(indices).astype(np.int64), np.concatenate(weights).astype(np.float32)


def _linear_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Along one axis of `size` patches, the two table rows (of `side`) each patch reads and their weights."""
    source = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(source)
    taps = np.clip(floor.astype(np.int64)[:, None] + np.arange(2), 0, side - 1)
    weights = np.clip(1 - np.abs(source[:, None] - floor[:, None] - np.arange(2, dtype=np.float32)), 0, None)
    return taps, weights.astype(np.float32)


def mrope_position_ids(input_ids: np.ndarray, image_token_id: int, grids: list[tuple[int, int, int]],
                       merge: int) -> tuple[np.ndarray, int]:
    """M-RoPE positions [3, L] for a prompt with still images, and the delta later text positions add.

    Text tokens count up on all three rows; an image's tokens take (start, start + row, start + column)
    and the text after it resumes at start + max(rows, columns).
    """
    positions = np.zeros((3, len(input_ids)), dtype=np.int64)
    grid_iter = iter(grids)
    current, index = 0, 0
    while index < len(input_ids):
        if input_ids[index] != image_token_id:
            positions[:, index] = current
            current += 1
            index += 1
            continue
        t, h, w = next(grid_iter)
        gh, gw = h // merge, w // merge
        count = t * gh * gw
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
        positions[:, index:index + count] = np.stack([tt, hh, ww]).reshape(3, -1) + current
        current += max(gh, gw)
        index += count
    return positions, int(positions.max()) + 1 - len(input_ids)


@dataclass
class SmokeInput:
    """A prompt with one image, ready for a forward."""

    family: str
    input_ids: np.ndarray  # [L] int64
    image_mask: np.ndarray  # [L] bool: the positions image embeddings fill, in order
    position_ids: np.ndarray  # [3, L] (M-RoPE) or [L]
    rope_delta: int  # a later token at sequence index i has position i + rope_delta (all rows)
    vision: VisionInputs | None  # Qwen2(.5)-VL
    pixel_values: np.ndarray  # Qwen-VL: [1, 3, S, S]; else the same array as vision.pixel_values

    def positions_after(self, count: int) -> np.ndarray:
        """Positions for `count` tokens appended to the prompt, shaped like `position_ids`."""
        start = len(self.input_ids)
        steps = np.arange(start, start + count, dtype=np.int64) + self.rope_delta
        return np.broadcast_to(steps, (3, count)).copy() if self.position_ids.ndim == 2 else steps


def tokenizer_special_tokens(directory: Path) -> dict[str, int]:
    """The added (special) tokens the tokenizer files in `directory` name, content -> id: tokenizer.json's
    `added_tokens` and tokenizer_config.json's `added_tokens_decoder`. Empty when there are none."""
    found: dict[str, int] = {}
    for name, entries in (("tokenizer.json", "added_tokens"), ("tokenizer_config.json", "added_tokens_decoder")):
        path = directory / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
            table = data.get(entries) or ([] if entries == "added_tokens" else {})
            pairs = ([(t["content"], t["id"]) for t in table] if isinstance(table, list)
                     else [(t["content"], int(i)) for i, t in table.items()])
        except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError, KeyError, TypeError):
            raise CorruptCheckpoint(f"{path}: not a tokenizer file vlhub can read ({entries} is malformed); "
                                    "fix or remove it") from None
        found.update({content: token for content, token in pairs
                      if isinstance(content, str) and type(token) is int and content not in found})
    return found


@dataclass(frozen=True)
class PromptTokens:
    """The ids a smoke prompt is made of, all read from the checkpoint: its vocabulary size, the special ids
    its config.json (or its tokenizer files) names, and ordinary text ids clear of every special one."""

    vocab: int
    special: frozenset[int]  # every id the config or the tokenizer reserves

    def word(self, official: int) -> int:
        """An ordinary id: the official one folded into this vocabulary, stepped down past special ids."""
        token = official % self.vocab
        for _ in range(self.vocab):
            if token not in self.special:
                return token
            token = (token - 1) % self.vocab
        raise UserError(f"every id of the {self.vocab}-token vocabulary is a special token: the smoke prompt has "
                        "no ordinary text; convert with --no-smoke")

    def words(self, officials: tuple[int, ...]) -> list[int]:
        return [self.word(token) for token in officials]

    def checked(self, token: object, what: str) -> int:
        """A special id the prompt needs, refused when it does not name a row of the embedding."""
        if token is None:
            raise UserError(f"{what} is missing: the smoke prompt needs it; fix config.json, or convert with --no-smoke")
        if type(token) is not int or not 0 <= token < self.vocab:
            raise UserError(f"{what} is {token!r}, outside the {self.vocab}-token vocabulary (vocab_size): the "
                            "smoke prompt cannot use it; fix config.json, or convert with --no-smoke")
        return token


def prompt_tokens(config: dict, tokenizer: dict[str, int]) -> PromptTokens:
    """What a smoke prompt for this config.json (and tokenizer files' special tokens) may use."""
    text = text_config(config)
    vocab = text.get("vocab_size")
    if type(vocab) is not int or vocab < 1:
        raise UserError(f"config.json vocab_size is {vocab!r}; the smoke test needs a positive integer")
    named = [text.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id", "video_token_id",
                                       "vision_token_id", *_VISION_TOKEN_KEYS)]
    named += [config.get(key) for key in ("video_token_id", "vision_token_id", *_VISION_TOKEN_KEYS)]
    ids = [token for value in named for token in (value if isinstance(value, list) else [value])]
    return PromptTokens(vocab, frozenset(t for t in [*ids, *tokenizer.values()] if type(t) is int))


def image_processing(config: dict, preprocessor: dict | None = None) -> ImageProcessing:
    """How the processor prepares an image for a model of this config.json (a family that resizes smartly): the
    checkpoint's preprocessor_config.json, its family's published one (`[processor]` in family.toml) where the
    checkpoint's is silent, the processor class's defaults (Qwen2-VL's) where both are. Its factor must be the
    vision tower's (patch x merge in config.json)."""
    geometry = VisionGeometry.from_config(config)
    factor = geometry.patch * geometry.merge
    family = family_of_config(config)
    published = (family.facts.get("processor") if family is not None else None) or {}
    found = ImageProcessing.from_preprocessor(preprocessor or {},
                                              ImageProcessing.from_preprocessor(published, ImageProcessing(factor)))
    if found.factor != factor:
        raise UserError(f"preprocessor_config.json cuts images into multiples of {found.factor} pixels (patch_size x "
                        f"merge_size), config.json's vision tower takes multiples of {factor}; fix one of them, or "
                        "convert with --no-smoke")
    return found


def smoke_input(config: dict, image_size: tuple[int, int] = SMOKE_IMAGE, *,
                tokenizer: dict[str, int] | None = None, preprocessor: dict | None = None) -> SmokeInput:
    """The smoke test's input for a model of this config.json, with the special tokens its tokenizer files
    name (`tokenizer_special_tokens`): chat markers where the tokenizer has them, the image placeholders the
    config names, the image prepared as its preprocessor_config.json says (`image_processing`). The family's
    own code (`vlhub/families/<family>/inputs.py`) builds it."""
    tokenizer = tokenizer or {}
    family = family_of_config(config)
    if family is None:
        raise UserError(f"config.json model_type {config.get('model_type')!r} is no family vlhub knows")
    processing = image_processing(config, preprocessor) if family.vision.resize == "smart" else None
    if processing is not None and processing.min_pixels > MAX_SMOKE_MIN_PIXELS:  # every image is resized up to it
        raise UserError(f"preprocessor_config.json min_pixels is {processing.min_pixels}: the smoke image would be "
                        f"resized to at least that, vlhub's smoke test takes at most {MAX_SMOKE_MIN_PIXELS}; convert "
                        "with --no-smoke")
    return family.code("inputs").smoke_input(config, prompt_tokens(config, tokenizer), tokenizer, image_size,
                                             processing)


def patch_grid_input(config: dict, tokens: PromptTokens, tokenizer: dict[str, int], image_size: tuple[int, int],
                     window_size: int | None = None, processing: ImageProcessing | None = None) -> SmokeInput:
    """The smoke input of a model whose processor cuts the image into merged patches and whose text model places
    them with multimodal rotary positions: the chat prompt around vision start, image pads and vision end. The
    image is resized and normalised as `processing` says (default: Qwen2(.5)-VL's processor)."""
    processing = processing or ImageProcessing()
    height, width = smart_resize(*image_size, factor=processing.factor, min_pixels=processing.min_pixels,
                                 max_pixels=processing.max_pixels)
    image = normalize(synthetic_image(height, width), processing.mean, processing.std)
    vision = vision_inputs([image], config, window_size)
    merge = VisionGeometry.from_config(config).merge
    count = vision.pixel_values.shape[0] // merge ** 2
    image_token, start, end = (tokens.checked(_vision_token(config, key, tokenizer), f"config.json {key}")
                               for key in _VISION_TOKEN_KEYS)
    if len({image_token, start, end}) < 3:
        raise UserError(f"config.json gives image_token_id {image_token}, vision_start_token_id {start} and "
                        f"vision_end_token_id {end}: they must differ; fix config.json, or convert with --no-smoke")
    # the chat turns' markers only where the tokenizer names them: no id is guessed
    open_turn = [tokens.checked(tokenizer[CHAT_START], f"the tokenizer's {CHAT_START}")] if CHAT_START in tokenizer else []
    close_turn = [tokens.checked(tokenizer[CHAT_END], f"the tokenizer's {CHAT_END}")] if CHAT_END in tokenizer else []
    ids = np.array([*open_turn, *tokens.words(USER_IDS), start, *[image_token] * count, end,
                    *tokens.words(QUESTION_IDS), *close_turn, *tokens.words(NEWLINE_IDS), *open_turn,
                    *tokens.words(ASSISTANT_IDS)], dtype=np.int64)
    positions, delta = mrope_position_ids(ids, image_token, vision.grids, merge)
    return SmokeInput(config["model_type"], ids, ids == image_token, positions, delta, vision, vision.pixel_values)


POSITION_TABLE = 2304  # num_position_embeddings when config.json leaves it out: a 48x48 table


def position_table_input(config: dict, tokens: PromptTokens, tokenizer: dict[str, int], image_size: tuple[int, int],
                         processing: ImageProcessing) -> SmokeInput:
    """`patch_grid_input` for a vision tower that adds a learned square position table resampled to the grid
    (`vision_config.num_position_embeddings` rows): besides the patches, the four taps per patch that resample it
    (`bilinear_taps`), computed here from the grid so a runtime can take them as inputs."""
    smoke = patch_grid_input(config, tokens, tokenizer, image_size, processing=processing)
    assert smoke.vision is not None
    side = math.isqrt((config.get("vision_config") or {}).get("num_position_embeddings", POSITION_TABLE))
    smoke.vision.interp_indices, smoke.vision.interp_weights = bilinear_taps(
        smoke.vision.grids, side, VisionGeometry.from_config(config).merge)
    return smoke


def _vision_token(config: dict, key: str, tokenizer: dict[str, int]) -> object:
    """The id config.json gives `key` (top level or in text_config), else the tokenizer's for its token."""
    for holder in (config, config.get("text_config") or {}):
        if key in holder:
            return holder[key]
    if _TOKEN_NAMES[key] in tokenizer:
        return tokenizer[_TOKEN_NAMES[key]]
    raise UserError(f"config.json has no {key} and no tokenizer file names {_TOKEN_NAMES[key]}: the smoke test "
                    f"cannot place an image; add {key} to config.json, or convert with --no-smoke")


def pad_rows(values: np.ndarray, rows: int) -> np.ndarray:
    """`values` followed by zero rows up to `rows` (a fixed-shape network's input)."""
    return np.pad(values, ((0, rows - len(values)), *[(0, 0)] * (values.ndim - 1)))


def padded_mask(mask: np.ndarray, rows: int) -> np.ndarray:
    """An additive [N, N] mask (MASKED where hidden) as a fixed-shape vision network takes it: [rows, rows] with
    DEVICE_MASKED, the padding rows one more segment, seen only among themselves."""
    count = len(mask)
    padded = np.full((rows, rows), DEVICE_MASKED, dtype=np.float32)
    padded[:count, :count] = np.where(mask < 0, DEVICE_MASKED, 0)
    padded[count:, count:] = 0
    return padded
