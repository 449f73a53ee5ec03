"""`vlhub plan`: how many patches and tokens images and videos become, and the compile sizes that hold them.

Examples:
    vlhub plan qwen2-vl-7b --image 1280x720
    vlhub plan qwen2-vl-7b --image 1280x720 --max-pixels 921600 --patches 4096
    vlhub plan qwen2.5-vl-3b --image 1920x1080 --image 200x5000 --target tpu-mlir
    vlhub plan qwen2-vl-2b --video 640x360 --frames 8 --json
    vlhub plan ./Qwen-VL-Chat --image 448x448 --target paddle-inference
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from vlhub.cli._errors import reports_errors
from vlhub.cli._options import JsonOpt, choices
from vlhub.cli._output import print_json, stdout
from vlhub.errors import UserError
from vlhub.plan import Plan, make_plan
from vlhub.sizes import DEFAULT_ANSWER_TOKENS, DEFAULT_PROMPT_TOKENS, parse_pixel_count, parse_size_pair
from vlhub.targets import layouts

ModelArg = Annotated[str, typer.Argument(
    metavar="MODEL", show_default=False,
    help="A catalog name (e.g. qwen2-vl-7b, tiny-qwen2-vl; its config is built in, nothing is downloaded) or a "
         "local checkpoint directory (its config.json is read).")]
ImageOpt = Annotated[list[str] | None, typer.Option(
    "--image", metavar="WxH", show_default=False,
    help="An image's width x height in pixels, width first: 1280x720 is 720p landscape (VastModelZOO writes it "
         "720x1280, height first). Repeat for more images.")]
VideoOpt = Annotated[str | None, typer.Option(
    "--video", metavar="WxH", show_default=False, help="A video's frame width x height; give --frames too.")]
FramesOpt = Annotated[int | None, typer.Option(
    "--frames", metavar="F", show_default=False, help="The --video's frame count (2 frames per grid step).")]
MaxPixelsOpt = Annotated[str | None, typer.Option(
    "--max-pixels", metavar="N", show_default=False,
    help="The processor's max_pixels (default 12845056 = 16384 x 28 x 28, the official preprocessor's).")]
MinPixelsOpt = Annotated[str | None, typer.Option(
    "--min-pixels", metavar="N", show_default=False, help="The processor's min_pixels (default 3136 = 56 x 56).")]
PatchesOpt = Annotated[int | None, typer.Option(
    "--patches", metavar="N", show_default=False,
    help=f"{' or '.join(t.name for t in layouts() if t.takes_patches)}: a given visual compile size (multiple of 16) "
         "to check every input against.")]
PromptOpt = Annotated[int, typer.Option(
    "--prompt-tokens", metavar="N", help="Text tokens beside the visual ones in the prefill.")]
AnswerOpt = Annotated[int, typer.Option("--answer-tokens", metavar="N", help="Tokens generated after the prefill.")]
TargetOpt = Annotated[str | None, typer.Option(
    "--target", metavar=choices(t.name for t in layouts()), show_default=False,
    help="One deployment layout (default: every one the model's family has a route to).")]


@reports_errors
def plan(
    model: ModelArg,
    image: ImageOpt = None,
    video: VideoOpt = None,
    frames: FramesOpt = None,
    max_pixels: MaxPixelsOpt = None,
    min_pixels: MinPixelsOpt = None,
    patches: PatchesOpt = None,
    prompt_tokens: PromptOpt = DEFAULT_PROMPT_TOKENS,
    answer_tokens: AnswerOpt = DEFAULT_ANSWER_TOKENS,
    target: TargetOpt = None,
    json: JsonOpt = False,
) -> None:
    """Count images' tokens and the compile sizes they need.

    The patches and tokens each input becomes, and the compile sizes that hold them.

    Each image is resized as the model's processor does (smart_resize to multiples of 28 within [min_pixels,
    max_pixels]; a video's frames with the same bounds, two frames to a grid step; a family that resizes every
    image to one size: that size, a fixed number of tokens), then cut into 14-pixel patches; 2x2 patches make a
    token. The compile sizes hold the largest input, one input per request: visual N (patches, a multiple of 16),
    prefill (its tokens + the prompt) and max context (+ the answer), multiples of 16 within
    max_position_embeddings. Then, for each deployment target the family has a route to (--target: one), the
    options that hold them and the `vlhub convert` command that builds it, checked as convert checks it (with
    --no-smoke where the smoke image would not fit).

    --json prints an object: model, family, min_pixels, max_pixels, prompt_tokens, answer_tokens, fit_patches
    (the N inputs are checked against), inputs (input, kind, width, height, frames, resized {height, width},
    grid [t, h, w], patches, tokens, fits, refit: null, or the input resized with the max_pixels that fits),
    compile (visual_patches, prefill_length, max_length, position_limit) and targets (by name: the target's own
    sizes and command, null where vlhub cannot build it; a target this model cannot take: unavailable, the
    reason)."""
    if frames is not None and video is None:
        raise UserError("--frames goes with --video WxH: the frame size of the video it counts")
    if video is not None and frames is None:
        raise UserError(f"--video {video} needs --frames F, the number of frames (e.g. 16)")
    clip = None if video is None else (*parse_size_pair(video, "--video"), frames)
    result = make_plan(model, images=[parse_size_pair(text) for text in image or []], video=clip,
                       min_pixels=_count(min_pixels, "--min-pixels", "the smallest", 3136),
                       max_pixels=_count(max_pixels, "--max-pixels", "the largest", 921600), patches=patches,
                       prompt_tokens=prompt_tokens,
                       answer_tokens=answer_tokens, target=target)
    if json:
        print_json(result.to_json())
        return
    stdout.print(_inputs_table(result))
    stdout.print()
    stdout.print(_sizes_table(result))


def _count(text: str | None, option: str, which: str, example: int) -> int | None:
    """The processor's min_pixels or max_pixels as typed: a pixel count (a size typed instead is answered with
    its count in one line)."""
    bound = option.removeprefix("--").replace("-", "_")
    return None if text is None else parse_pixel_count(text, option, f"the processor's {bound}, {which} image's",
                                                        example)


def _inputs_table(result: Plan) -> Table:
    sizing = result.sizing
    bounds = (f"resized to {sizing.inputs[0].resized_size}" if result.min_pixels is None
              else f"resized within {result.min_pixels}..{result.max_pixels} pixels")
    table = Table("input WxH", "resized WxH", "grid t x h x w", "patches", "tokens", f"fits N={sizing.fit_patches}",
                  box=None, title=f"{escape(result.model)} ({result.family}): {bounds}", title_justify="left")
    for item, refit in zip(sizing.inputs, result.refits):
        fits = "yes" if refit is None else (
            f"no: at max_pixels {refit.max_pixels} it becomes {refit.input.resized_size}, {refit.input.patches} "
            "patches")
        table.add_row(item.label, item.resized_size, "x".join(map(str, item.grid)), str(item.patches),
                      str(item.tokens), fits)
    return table


def _sizes_table(result: Plan) -> Table:
    sizing = result.sizing
    sizes = sizing.sizes
    largest = max(sizing.inputs, key=lambda item: item.tokens)
    table = Table("size", "value", "why", box=None, title="compile sizes (one input per request)",
                  title_justify="left")
    table.add_row("visual N", str(sizes.visual_patches), "patches of the largest input, rounded up to a multiple of 16")
    table.add_row("prefill", str(sizes.prefill_length),
                  f"its {largest.tokens} tokens + {sizing.prompt_tokens} prompt, rounded up to 16")
    table.add_row("max context", str(sizes.max_length), f"prefill + {sizing.answer_tokens} answer, rounded up to 16; "
                                                        f"the model allows {sizes.position_limit}")
    for name, planned in result.targets.items():
        for row in planned.rows(sizing, result.command(name)):
            table.add_row(*map(escape, row))
    for name, why in result.unavailable.items():
        table.add_row(name, "not for this model", escape(why))
    return table

