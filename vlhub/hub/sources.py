"""Turn what a user typed as SRC (a catalog name, a repo id or a path) into a local path."""

from __future__ import annotations

from pathlib import Path

from vlhub.catalog import ModelSpec, find_model, unknown_model_message
from vlhub.errors import UserError, VlhubError
from vlhub.formats.readers import open_checkpoint


def resolve_source(source: str) -> Path:
    """A local path for SRC. Tiny models are generated on first use; other catalog models must
    already be on disk (the Hugging Face cache is consulted, offline)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    spec = find_model(source)
    if spec is not None:
        return _local_copy(spec)
    if path.suffix or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise UserError(f"no such file or directory: {source}")
    raise UserError(unknown_model_message(source))


def _local_copy(spec: ModelSpec) -> Path:
    if spec.tiny:
        from vlhub.hub.tiny import ensure_tiny_model

        return ensure_tiny_model(spec)
    path = cached_snapshot(spec)
    if path is None:
        raise UserError(f"{spec.name} ({spec.hf_repo}) is not on this machine: `vlhub download {spec.name}` fetches "
                        "it (`vlhub convert` does so by itself)")
    return path


def cached_snapshot(spec: ModelSpec) -> Path | None:
    """The catalog model's snapshot in the Hugging Face cache, if one is there with a whole checkpoint (every
    shard its index names: a download limited by --include may hold only some files). No network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(spec.hf_repo, local_files_only=True))
        open_checkpoint(path).close()
    except (LocalEntryNotFoundError, VlhubError):
        return None
    return path
