"""Fetching a model from either hub: the one entry point that chooses the client (`vlhub.hub.download` for the
Hugging Face Hub, `vlhub.hub.modelscope` for ModelScope), so neither client module imports the other."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from vlhub.errors import UserError
from vlhub.hub.download import HuggingFaceDownload, resolve_repo
from vlhub.hub.locks import lock_path
from vlhub.hub.modelscope import ModelScopeDownload
from vlhub.hub.records import RemoteFile, RepoRef
from vlhub.owned import exclusive_lock


class Download(Protocol):
    """A listed, checked download: `fetch` transfers what is missing and returns the snapshot directory."""

    ref: RepoRef
    commit: str
    files: list[RemoteFile]
    missing_bytes: int  # what the listing says is still to fetch (for the progress bar and the disk check)
    downloaded_bytes: int  # what `fetch` received

    def fetch(self, on_bytes: Callable[[int], None] | None = None) -> Path: ...


@contextmanager
def open_download(
    model: str,
    *,
    source: str = "huggingface",
    revision: str | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    endpoint: str | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[Download]:
    """Lock the model's revision, list its files, refuse unsafe names and a too-full disk; yield the download.
    Tokens come from the clients' own settings (HF_TOKEN or `hf auth login`; MODELSCOPE_API_TOKEN)."""
    ref = resolve_repo(model, source, revision)
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise UserError(f"--endpoint {endpoint!r}: write the URL with its scheme, e.g. https://hf-mirror.com")
    with exclusive_lock(lock_path(ref.source, ref.repo_id, ref.revision), on_wait=on_wait):
        if source == "huggingface":
            download: Download = HuggingFaceDownload(ref, include, exclude, endpoint)
        else:
            download = ModelScopeDownload(ref, include, exclude, endpoint)
        yield download
