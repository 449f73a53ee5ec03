"""What a checkpoint is, from its headers alone: family, layout, format, sizes, dtypes."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vlhub.convert.layouts import describe_layout, detect_family, detect_layout, embedding_candidates
from vlhub.formats.readers import Checkpoint, open_checkpoint
from vlhub.keymaps.config import tie_word_embeddings


@dataclass
class TensorRow:
    name: str
    shape: list[int]
    dtype: str
    shard: str


@dataclass
class InspectReport:
    """The answer of `vlhub inspect`; `to_json()` is its --json form."""

    path: str
    family: str | None
    layout: str
    layout_description: str
    format: str
    shards: list[str]
    index_file: str | None
    num_tensors: int
    num_params: int
    total_bytes: int
    dtypes: dict[str, int]
    tie_word_embeddings: bool | None
    other_formats: list[str] = field(default_factory=list)
    tensors: list[TensorRow] | None = None

    def to_json(self) -> dict:
        data = asdict(self)
        if self.tensors is None:
            del data["tensors"]
        return data


def inspect_checkpoint(path: Path | str, *, list_tensors: bool = False) -> InspectReport:
    """Read only headers and describe the checkpoint at `path`."""
    with open_checkpoint(path) as checkpoint:
        return describe(checkpoint, list_tensors=list_tensors)


def describe(checkpoint: Checkpoint, *, list_tensors: bool = False) -> InspectReport:
    """An `InspectReport` for an opened checkpoint."""
    metas = checkpoint.tensors
    family = detect_family(checkpoint.config, list(metas))
    layout = detect_layout(family, metas, checkpoint.config)
    return InspectReport(
        path=str(checkpoint.root),
        family=family,
        layout=layout,
        layout_description=describe_layout(family, layout),
        format=checkpoint.format.name,
        shards=checkpoint.shards,
        index_file=checkpoint.index_file,
        num_tensors=len(metas),
        num_params=sum(meta.numel for meta in metas.values()),
        total_bytes=checkpoint.total_bytes,
        dtypes=dict(Counter(meta.dtype for meta in metas.values()).most_common()),
        tie_word_embeddings=_tied(checkpoint, family, layout),
        other_formats=checkpoint.other_formats,
        tensors=[TensorRow(m.name, list(m.shape), m.dtype, m.shard) for m in metas.values()] if list_tensors else None,
    )


def _tied(checkpoint: Checkpoint, family: str | None, layout: str) -> bool | None:
    """config.json's word, else: an embedding without an lm_head beside it is tied."""
    if checkpoint.config:
        return tie_word_embeddings(checkpoint.config)
    if "lm_head.weight" in checkpoint.tensors:
        return False
    if any(name in checkpoint.tensors for name in embedding_candidates(family, layout)):
        return True
    return None
