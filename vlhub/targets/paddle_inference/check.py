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

CONVERT_SECONDS = (133.9, "Performance: 133.9 s for 16.6 GB (--no-smoke), scaled by bytes")
SMOKE_SECONDS = (162.6, "Performance: 162.6 s for 16.6 GB, scaled by bytes")
# the smoke test holds one decoder layer's graph at a time, so its peak follows the largest layer, not the model
SMOKE_MEMORY_7B = (2.40e9, "Performance: 2.40 GB measured for the 7B shape (one layer's graph at a time)")
SMOKE_MEMORY_72B = (3.91e9, ("Performance: 3.91 GB measured for the 72B shape, the widest dense layer (one layer's "
                             "graph at a time)"))
# every graph's predictor kept, as a deployment serving from memory runs them: the whole model's weights and the
# float32 casts, as the single text graph held them when its smoke test ran it whole
SERVE_MEMORY = (18.22e9, "Performance: 18.22 GB for 16.6 GB of weights with every graph held, scaled by bytes")


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
    """The weights and the graphs' export, then the static graphs' smoke test (time measured at 7B; memory at 7B,
    or at the 72B shape for a larger model: it holds one decoder layer, however many there are)."""
    by_bytes = model_bytes / BYTES_7B
    memory = SMOKE_MEMORY_7B if model_bytes <= BYTES_7B else SMOKE_MEMORY_72B
    return [scaled("convert", "time", CONVERT_SECONDS, by_bytes), scaled("smoke", "memory", memory, 1.0),
            scaled("smoke", "time", SMOKE_SECONDS, by_bytes)]


def next_needs(model_bytes: int) -> list[Need]:
    """Serving the layout with every graph's predictor kept: the weights and the graphs' float32 work, as measured
    at 7B."""
    return [scaled("serve", "memory", SERVE_MEMORY, model_bytes / BYTES_7B)]
