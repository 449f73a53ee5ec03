"""Paddle Inference's one compile size, the static graphs' max_seq_len (prompt plus answer): what `vlhub plan`
prints for it and what `--to paddle-inference` and `vlhub check` hold it to."""

from __future__ import annotations

from dataclasses import dataclass

from vlhub.errors import UserError
from vlhub.family_registry import Family
from vlhub.sizes import Sizing, position_limit
from vlhub.targets.paddle_inference import NAME


@dataclass(frozen=True)
class PositionLimit:
    """The most positions the static graphs run as the model computes: `value`, the config's `key` (as said in
    messages, `said`), and `why` a family's limit is below max_position_embeddings."""

    value: int
    key: str
    said: str
    why: str


def graph_positions(family: Family, config: dict) -> PositionLimit:
    """The family's own limit (`[targets.paddle-inference] position_limit`), else max_position_embeddings."""
    own = family.route(NAME).get("position_limit")
    if own is None:
        return PositionLimit(position_limit(config), "max_position_embeddings", "the model's max_position_embeddings",
                             "")
    return PositionLimit(int(config.get(own["key"]) or own["default"]), own["key"],
                         f"{family.display_name}'s {own['key']}", f", {own['why']}")


def check_max_seq_len(family: Family, config: dict, max_seq_len: int, fix: str = "--max-seq-len") -> None:
    """Refuse a max_seq_len the static graphs cannot run (`fix` names what to lower). `vlhub plan` and `vlhub
    convert --to paddle-inference` both check it here."""
    if max_seq_len < 1:
        raise UserError("--max-seq-len must be positive")
    limit = graph_positions(family, config)
    if max_seq_len > limit.value:
        raise UserError(f"{max_seq_len} positions pass {limit.said} {limit.value}{limit.why}; lower {fix}")


@dataclass(frozen=True)
class PaddleInferencePlan:
    """The max_seq_len that holds the planned inputs' prefill and answer."""

    max_seq_len: int

    def command_options(self) -> str:
        return f"--max-seq-len {self.max_seq_len}"

    def summary(self) -> str:
        return f"max seq len {self.max_seq_len}"

    def rows(self, sizing: Sizing, command: str | None) -> list[tuple[str, str, str]]:
        return [(NAME, self.command_options(), command or "")]

    def to_json(self) -> dict:
        return {"max_seq_len": self.max_seq_len}


def paddle_inference_plan(sizing: Sizing) -> PaddleInferencePlan:
    """Paddle Inference's max_seq_len (prompt plus answer), checked as `vlhub convert --to paddle-inference` checks
    it."""
    check_max_seq_len(sizing.family, sizing.config, sizing.sizes.max_length, "--prompt-tokens or --answer-tokens")
    return PaddleInferencePlan(sizing.sizes.max_length)
