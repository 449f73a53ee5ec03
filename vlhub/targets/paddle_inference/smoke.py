"""The smoke test of a Paddle Inference layout: its static graphs under paddle.inference, one graph at a time (the
prompt, then each reference token as a decode step over the KV cache: their own greedy tokens up to the first
difference), and the weight folder Paddle's loaders read, teacher-forced in Paddle, each against the reference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlhub.smoke.inputs import SmokeInput
from vlhub.smoke.run import (
    Outputs,
    Reference,
    RuntimeMissing,
    Status,
    checkpoint_outputs,
    compare_runs,
    vision_kwargs,
)
from vlhub.smoke.verdict import SmokeReport

RUNTIME = "paddle-inference"


@dataclass
class StaticGraphRunner:
    """The layout at `artifact` with its weight folder `weights`."""

    artifact: Path
    weights: Path

    def run(self, reference: Path, tokens: int, streamed: bool | None, say: Status) -> SmokeReport:
        source = Reference.probe(reference, streamed)
        report = source.report(self.artifact, weights=self.weights, runtime=RUNTIME)
        if not report.stages:  # the weights load
            compare_runs(source, report, tokens, say, lambda expected: [
                ("", lambda: static_outputs(self.artifact, self.weights, source.smoke, expected.tokens, say)),
                ("weights: ", lambda: checkpoint_outputs(self.weights, "paddle", source.smoke, expected.tokens,
                                                         source.resident, say))])
        return report


def static_outputs(layout: Path, weights: Path, smoke: SmokeInput, reference_tokens: list[int],
                   say: Status) -> Outputs:
    """The static graphs' outputs under paddle.inference, each graph's predictor created, run and released in turn,
    so memory holds one graph (a decoder layer or a block of the output projection) whatever the model's size."""
    try:
        from vlhub.targets.paddle_inference.static import CHECKPOINTS, StaticPredictor
    except ImportError as exc:
        raise RuntimeMissing(f"running Paddle Inference graphs needs paddlepaddle ({exc}); "
                             "install it with: pip install 'vlhub[paddle]'") from None
    predictor = StaticPredictor(layout / CHECKPOINTS, weights, resident=False)
    try:
        say("paddle inference: vision encoder")
        embeds = predictor.encode_images(smoke.pixel_values, **vision_kwargs(smoke))
        say("paddle inference: decoder layers one graph at a time (prefill, then decode steps), then the head")
        prompt_logits, generated = predictor.teacher_forced(smoke.input_ids, smoke.position_ids, embeds,
                                                            smoke.image_mask, reference_tokens, smoke.positions_after)
    finally:
        predictor.close()
    return Outputs(embeds, prompt_logits, generated)
