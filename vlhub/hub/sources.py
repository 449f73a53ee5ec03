"""What a user typed as SRC (a catalog name, a repo id or a path), resolved once into a `Source`."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from vlhub.catalog import ModelSpec, find_model, unknown_model_message
from vlhub.errors import UserError, VlhubError
from vlhub.formats.readers import open_checkpoint
from vlhub.hub.home import is_repo_id, vlhub_home
from vlhub.hub.records import all_records
from vlhub.owned import put_back


@dataclass(frozen=True)
class Source:
    """SRC resolved: the catalog entry it names (if any), where it is on this machine (None: a catalog model not
    downloaded yet) and the revision that copy holds."""

    given: str
    model: ModelSpec | None
    path: Path | None

    @property
    def revision(self) -> str:
        """A hub snapshot's commit, a built-in model's generator version, `local` or `unknown` (not here)."""
        return revision_of(self.path)

    @property
    def name(self) -> str:
        """The catalog name, else the checkpoint directory's name."""
        if self.model is not None:
            return self.model.name
        assert self.path is not None
        return (self.path if self.path.is_dir() else self.path.parent).name

    def local(self) -> Path:
        """Where the source is; UserError when it is a catalog model that is not on this machine."""
        if self.path is None:
            assert self.model is not None
            raise UserError(f"{self.model.name} ({self.model.hf_repo}) is not on this machine: `vlhub download "
                            f"{self.model.name}` fetches it (`vlhub convert` does so by itself)")
        return self.path

    def downloaded(self, path: Path) -> Source:
        """The same source, now on this machine at `path`."""
        return replace(self, path=path)


def locate_source(text: str) -> Source:
    """SRC as a `Source`: a path that exists (first, as `hf` and transformers take it: a directory named like a
    catalog model is that directory), else a catalog model (tiny models are generated on first use; other models
    are looked for in the Hugging Face cache, offline), else a repo id downloaded here (see `downloaded_repo`).
    UserError for anything else."""
    path = Path(text).expanduser()
    put_back(path)
    if path.exists():
        return Source(text, None, path)
    spec = find_model(text)
    if spec is not None:
        return Source(text, spec.usable(), _local_copy(spec))
    if is_repo_id(text):
        snapshot = downloaded_repo(text)
        if snapshot is None:
            raise UserError(f"{text} is not a local path (no such file or directory), a catalog model or a repo "
                            f"downloaded here: `vlhub download {text}` fetches the repo first (`vlhub models` lists "
                            "the catalog)")
        return Source(text, None, snapshot)
    if path.suffix or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise UserError(f"no such file or directory: {text}")
    raise UserError(unknown_model_message(text))


def resolve_source(text: str) -> Path:
    """A local path for SRC (see `locate_source`); UserError when it is not on this machine."""
    return locate_source(text).local()


def _local_copy(spec: ModelSpec) -> Path | None:
    if spec.tiny:
        from vlhub.hub.tiny import ensure_tiny_model

        return ensure_tiny_model(spec)
    return cached_snapshot(spec)


def cached_snapshot(spec: ModelSpec) -> Path | None:
    """The catalog model's snapshot in the Hugging Face cache (see `_hf_cached`). No network."""
    return _hf_cached(spec.hf_repo) if spec.hf_repo else None


def downloaded_repo(repo_id: str) -> Path | None:
    """A repo outside the catalog, downloaded here: its snapshot of `main` in the Hugging Face cache, as `hf` and
    transformers find it, else the snapshot of vlhub's latest download of it (another revision, ModelScope), with a
    whole checkpoint. No network."""
    found = _hf_cached(repo_id)
    if found is not None:
        return found
    wanted = repo_id.lower()
    recorded = sorted((r for r in all_records() if r.repo_id.lower() == wanted),
                      key=lambda r: max((f.verified_at for f in r.files.values()), default=""), reverse=True)
    return next((Path(r.path) for r in recorded if _whole_checkpoint(Path(r.path))), None)


def _hf_cached(repo_id: str) -> Path | None:
    """The repo's snapshot in the Hugging Face cache, if one is there with a whole checkpoint (every shard its index
    names: a download limited by --include may hold only some files)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        return None
    return path if _whole_checkpoint(path) else None


def _whole_checkpoint(path: Path) -> bool:
    try:
        open_checkpoint(path).close()
    except VlhubError:
        return False
    return True


def hub_snapshot(path: Path) -> tuple[str, str] | None:
    """(repo folder, revision) when `path` is in a hub cache snapshot: Hugging Face's
    …/models--Org--Name/snapshots/<commit>/, ModelScope's …/models/Org--Name/snapshots/<revision>/."""
    parts = path.resolve().parts
    for i in range(2, len(parts) - 1):
        if parts[i] == "snapshots" and (parts[i - 1].startswith("models--") or parts[i - 2] == "models"):
            return parts[i - 1], parts[i + 1]
    return None


def revision_of(path: Path | None) -> str:
    """The revision a source directory holds: a hub snapshot's commit, a built-in model's generator version."""
    if path is None:
        return "unknown"
    snapshot = hub_snapshot(path)
    if snapshot is not None:
        return snapshot[1]
    tiny_root = (vlhub_home() / "tiny").resolve()
    if tiny_root in path.resolve().parents:
        return f"builtin-{path.resolve().relative_to(tiny_root).parts[0]}"
    return "local"
