"""`vlhub check` of a Paddle Inference layout: the dtype its family's inference loader reads, max_seq_len against the
model's positions and the --image sizes, paddlepaddle, and the memory serving it takes."""

from __future__ import annotations

from vlhub.deploy.checks import (
    BYTES_7B,
    FAIL,
    PASS,
    Check,
    LayoutContext,
    Need,
    image_check,
    image_plans,
    planned_fix,
    scaled,
)
from vlhub.errors import UserError
from vlhub.family_registry import FAMILIES
from vlhub.sizes import DEFAULT_ANSWER_TOKENS, DEFAULT_PROMPT_TOKENS, InputPlan, compile_sizes
from vlhub.targets.paddle_inference.build import inference_dtype
from vlhub.targets.paddle_inference.plan import graph_positions

CONVERT_SECONDS = (79.1, "README Performance: 79.1 s for 16.6 GB, scaled by bytes")
SMOKE_SECONDS = (280.4 - 79.1, "README Performance: 201 s for 16.6 GB, scaled by bytes")
SERVE_MEMORY = (18.22e9, "README Performance: 18.22 GB for 16.6 GB of weights, scaled by bytes")


def dtype_check(ctx: LayoutContext, stored: str | None) -> Check | None:
    """Weights of a dtype the family's inference loader misreads, or other than the manifest records."""
    assert ctx.family is not None
    try:
        inference_dtype(FAMILIES[ctx.family], stored, stored or "")
    except UserError as exc:
        return Check("weights", "dtype", FAIL, f"{stored} weights, which this family's inference loader misreads "
                     f"({exc})", ctx.reconvert("--dtype float16"))
    recorded = ctx.recorded.dtype
    if recorded and recorded != stored:
        return Check("weights", "dtype", FAIL, f"the manifest says {recorded}, the weights are {stored}",
                     ctx.reconvert())
    return None


def number_checks(ctx: LayoutContext) -> list[Check]:
    """--max-seq-len against the positions the graphs run as the model computes, and each --image's tokens plus a
    prompt and an answer against it."""
    assert ctx.config is not None and ctx.family is not None
    max_seq_len = int(ctx.recorded.details["max_seq_len"])
    limit = graph_positions(FAMILIES[ctx.family], ctx.config)
    checks = [Check("numbers", "sequence length", FAIL if max_seq_len > limit.value else PASS,
                    f"--max-seq-len {max_seq_len}, the model's {limit.key} is {limit.value}",
                    ctx.reconvert(f"--max-seq-len {limit.value} or less") if max_seq_len > limit.value else "")]
    for item in image_plans(ctx):
        needed = item.tokens + DEFAULT_PROMPT_TOKENS + DEFAULT_ANSWER_TOKENS
        wrong = [(f"{item.tokens} tokens + {DEFAULT_PROMPT_TOKENS} prompt + {DEFAULT_ANSWER_TOKENS} answer = {needed}, "
                 f"more than --max-seq-len {max_seq_len}")] if needed > max_seq_len else []
        checks.append(image_check(ctx, item, wrong, f"{item.tokens} tokens + prompt and answer = {needed} of "
                                  f"--max-seq-len {max_seq_len}", lambda item: planned_fix(
                                      ctx, item, lambda: f"--max-seq-len {_holding(ctx, item)}")))
    return checks


def _holding(ctx: LayoutContext, item: InputPlan) -> int:
    """The max_seq_len whose graphs hold `item`, a prompt and an answer."""
    assert ctx.config is not None
    return compile_sizes(ctx.config, [item]).max_length


def build_needs(params: int, model_bytes: int) -> list[Need]:
    """The weights and the graphs' export, then the static graphs' smoke test (measured at 7B)."""
    by_bytes = model_bytes / BYTES_7B
    return [scaled("convert", "time", CONVERT_SECONDS, by_bytes), scaled("smoke", "time", SMOKE_SECONDS, by_bytes)]


def next_needs(model_bytes: int) -> list[Need]:
    """Serving the layout: the weights and the graphs' float32 work, as measured at 7B."""
    return [scaled("serve", "memory", SERVE_MEMORY, model_bytes / BYTES_7B)]
