"""Fetching a model from either hub: the one entry point that chooses the client (`vlhub.hub.download` for the
Hugging Face Hub, `vlhub.hub.modelscope` for ModelScope), so neither client module imports the other."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from vlhub.errors import UserError
from vlhub.hub.download import EVERYTHING, DownloadOptions, HuggingFaceDownload, resolve_repo
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

    def will_download(self, file: RemoteFile) -> bool: ...

    @property
    def unchecked(self) -> list[RemoteFile]: ...  # there already, hashed by `fetch` before it is taken

    def fetch(self, on_bytes: Callable[[int], None] | None = None) -> Path: ...


@contextmanager
def open_download(
    model: str,
    *,
    source: str = "huggingface",
    revision: str | None = None,
    options: DownloadOptions = EVERYTHING,
    endpoint: str | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[Download]:
    """Lock the model's revision, list its files, refuse unsafe names and a too-full disk; yield the download.
    Tokens: --token, else the clients' own settings (HF_TOKEN or `hf auth login`; MODELSCOPE_API_TOKEN). A dry run
    takes no lock and writes nothing."""
    ref = resolve_repo(model, source, revision)
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise UserError(f"--endpoint {endpoint!r}: write the URL with its scheme, e.g. https://hf-mirror.com")
    if options.local_dir is not None and options.cache_dir is not None:
        raise UserError("--local-dir and --cache-dir both say where files go: pass one of them (as `hf download`)")
    if options.max_workers < 1:
        raise UserError(f"--max-workers {options.max_workers}: give 1 or more")
    # absolute, as hf download makes them: the path printed and the one the record keeps hold from any directory
    options = replace(options, cache_dir=_absolute(options.cache_dir), local_dir=_absolute(options.local_dir))
    with ExitStack() as held:
        if not options.dry_run:
            held.enter_context(exclusive_lock(lock_path(ref.source, ref.repo_id, ref.revision), on_wait=on_wait))
        if source == "huggingface":
            download: Download = HuggingFaceDownload(ref, options, endpoint)
        else:
            download = ModelScopeDownload(ref, options, endpoint)
        yield download


def _absolute(path: Path | None) -> Path | None:
    return None if path is None else path.expanduser().resolve()
