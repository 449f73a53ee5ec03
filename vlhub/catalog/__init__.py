"""The model catalog: every supported model by short name or repo id, with its official config."""

from __future__ import annotations

import difflib
import json
import math
import sys
from dataclasses import dataclass
from functools import cache
from importlib import resources

from vlhub.errors import UserError
from vlhub.family_registry import FAMILIES, Family
from vlhub.keymaps.config import tie_word_embeddings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@dataclass(frozen=True)
class ModelSpec:
    """One catalog entry. `config` is the official config.json as a dict."""

    name: str
    family: Family
    hf_repo: str | None
    modelscope_repo: str | None
    config: dict
    tiny: bool = False
    max_shard_size: int | None = None
    refused: str | None = None  # why vlhub lists this release but does not convert it (one line)

    @property
    def params(self) -> int:
        return sum(math.prod(shape) for _, shape in self.family.official_tensors(self.config))

    @property
    def size_bytes(self) -> int:
        """Size of the official bf16 checkpoint's tensors."""
        return 2 * self.params

    @property
    def tie_word_embeddings(self) -> bool:
        return tie_word_embeddings(self.config)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "family": self.family.name,
            "hf_repo": self.hf_repo,
            "modelscope_repo": self.modelscope_repo,
            "params": self.params,
            "size_bytes": self.size_bytes,
            "tie_word_embeddings": self.tie_word_embeddings,
            "tiny": self.tiny,
            "refused": self.refused,
        }

    def usable(self) -> ModelSpec:
        """This entry, or a UserError with its reason when vlhub lists the release but does not convert it."""
        if self.refused:
            raise UserError(f"{self.name} ({self.hf_repo}): {self.refused}")
        return self


@cache
def models() -> dict[str, ModelSpec]:
    """Every catalog model by short name, official models first."""
    root = resources.files(__package__)
    table = tomllib.loads((root / "models.toml").read_text())["models"]
    specs = {}
    for name, entry in table.items():
        config = json.loads((root / "configs" / f"{entry.get('config', name)}.json").read_text())
        specs[name] = ModelSpec(
            name=name,
            family=FAMILIES[entry["family"]],
            hf_repo=entry.get("hf_repo"),
            modelscope_repo=entry.get("modelscope_repo"),
            config=config,
            tiny=entry.get("tiny", False),
            max_shard_size=entry.get("max_shard_size"),
            refused=entry.get("refused"),
        )
    return specs


def find_model(name: str) -> ModelSpec | None:
    """The model a short name or Hugging Face / ModelScope repo id names (case-insensitive), if any."""
    wanted = name.strip().lower()
    for spec in models().values():
        if wanted in {spec.name, (spec.hf_repo or "").lower(), (spec.modelscope_repo or "").lower()}:
            return spec
    return None


def get_model(name: str) -> ModelSpec:
    """Like `find_model`, but an unknown name is a user error that suggests close names."""
    spec = find_model(name)
    if spec is None:
        raise UserError(unknown_model_message(name))
    return spec


def unknown_model_message(name: str) -> str:
    names = list(models())
    close = difflib.get_close_matches(name.lower(), names, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return f"unknown model {name!r}: {hint}(`vlhub models` lists the models vlhub knows)"
