"""ModelScope downloads through the `modelscope` package (its `modelscope_hub` client): the extra `modelscope`.

The client hashes each file against the listing's Sha256 and resumes `<file>.incomplete` across runs by
itself, but writes whatever names the listing holds, `..` and absolute paths included. So vlhub lists first,
refuses unsafe names and a too-full disk, and hands the client exactly the checked file list. Files land in
$MODELSCOPE_CACHE (default ~/.cache/modelscope)/models/<owner>--<name>/snapshots/<revision>/, real files.
ModelScope revisions are branch or tag names with no commit id: the record keeps each file's Sha256.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlhub.atomic import ensure_free_space
from vlhub.errors import CheckFailed, UserError
from vlhub.hub.download import (
    DownloadFailed,
    DownloadOptions,
    cached_record,
    checked_files,
    hash_file,
    offline_files,
    one_line,
    probe,
    unreachable,
    unreachable_reason,
)
from vlhub.hub.records import DownloadRecord, RemoteFile, RepoRef, load_record, save_record
from vlhub.units import format_size, now_iso

DEFAULT_ENDPOINT = "https://modelscope.cn"


def modelscope_cache() -> Path:
    """$MODELSCOPE_CACHE, default ~/.cache/modelscope: where the client keeps `models/<owner>--<name>/`."""
    return Path(os.environ.get("MODELSCOPE_CACHE") or Path.home() / ".cache" / "modelscope")


def _client() -> Any:
    try:
        import modelscope_hub
    except ImportError:
        raise UserError("--source modelscope needs the modelscope package: pip install 'vlhub[modelscope]'") from None
    logging.getLogger("modelscope_hub").setLevel(logging.WARNING)  # its INFO lines would break up the progress bar
    return modelscope_hub


class ModelScopeDownload:
    """A ModelScope repo revision fetched into the ModelScope cache."""

    def __init__(self, ref: RepoRef, options: DownloadOptions, endpoint: str | None) -> None:
        if options.local_dir is not None:
            raise UserError("--local-dir is for --source huggingface; ModelScope's files go to its cache "
                            "(MODELSCOPE_CACHE, or --cache-dir)")
        client = _client()
        self.ref = ref
        self.options = options
        self.endpoint = (endpoint or os.environ.get("MODELSCOPE_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        self.api = client.HubApi(endpoint=self.endpoint, token=options.token or os.environ.get("MODELSCOPE_API_TOKEN"))
        self.cache_dir = options.cache_dir or modelscope_cache()
        self.commit = ref.revision
        self.downloaded_bytes = 0
        self.snapshot = (self.cache_dir / "models" / ref.repo_id.replace("/", "--") / "snapshots" / ref.revision)
        from huggingface_hub import constants

        self.offline = bool(constants.HF_HUB_OFFLINE)
        if self.offline:  # vlhub's offline switch for either hub: the cache's copy, no connection
            self.record = cached_record(load_record(ref.source, ref.repo_id, self.commit), ref, options,
                                        self.cache_dir)
            self.snapshot = Path(self.record.path)  # the client may have used an older SDK's folder
            self.files = offline_files(self.record, ref, options, self._present)
            self.missing_bytes = 0
            return
        probe(self.endpoint, ref)  # the client retries even a name that does not resolve, for seconds
        try:  # the client retries dropped connections and 5xx itself
            infos = self.api.list_repo_files(ref.repo_id, "model", revision=ref.revision, recursive=True)
        except client.errors.NotExistError:
            raise UserError(f"{self.endpoint} has no repo {ref.repo_id} at revision {ref.revision!r} (or it is "
                            "private: pass --token or set MODELSCOPE_API_TOKEN)") from None
        except client.errors.HubError as exc:
            raise self._failed(f"listing {ref} on {self.endpoint} failed", exc) from None
        listed = [RemoteFile(i.path, i.size, (i.sha256 or "").lower() or None, None) for i in infos if not i.is_dir]
        self.files = checked_files(listed, ref, options)
        self.record = load_record(ref.source, ref.repo_id, self.commit) or DownloadRecord.new(
            ref, self.commit, self.snapshot, self.endpoint, options.filtered)
        if not options.filtered:
            self.record.filtered = False
        self.missing_bytes = sum(f.size - self._partial_size(f) for f in self.files if self.will_download(f))
        if options.dry_run:
            return
        ensure_free_space(self.cache_dir, self.missing_bytes,
                          f"the {len(self.files)} files of {ref} ({format_size(sum(f.size for f in self.files))}; "
                          "what is not yet in the cache)")

    def _present(self, file: RemoteFile) -> bool:
        path = self.snapshot / file.path
        return path.is_file() and path.stat().st_size == file.size

    def will_download(self, file: RemoteFile) -> bool:
        """Whether `fetch` transfers this file (for --dry-run; one changed upstream at the same size too)."""
        return self.options.force or not self._present(file)

    def _failed(self, what: str, exc: Exception) -> Exception:
        """A client error as vlhub's: the hub unreachable (exit 3 with the remedies), or failing after the client's
        retries (exit 3, resumable)."""
        reason = unreachable_reason(exc)
        if reason is not None:
            return unreachable(self.endpoint, reason, self.ref)
        return DownloadFailed(f"{what}: {one_line(exc)}; run the same command again to resume")

    def _partial_size(self, file: RemoteFile) -> int:
        partial = self.snapshot / f"{file.path}.incomplete"
        size = partial.stat().st_size if partial.is_file() else 0
        return size if size <= file.size else 0

    @property
    def unchecked(self) -> list[RemoteFile]:
        """The files `fetch` hashes before deciding whether to transfer them: there, never checked by vlhub."""
        return [f for f in self.files if not self.will_download(f) and not self.record.verified(f)]

    def fetch(self, on_bytes: Callable[[int], None] | None = None) -> Path:
        """Check what is already there, download the rest (the client checks each Sha256), record it."""
        client = _client()
        unchecked = {f.path for f in self.unchecked}
        missing = []
        for file in self.files:  # a file changed upstream at the same size fails its hash: fetch it again
            if self.will_download(file) or (file.path in unchecked and
                                           hash_file(self.snapshot / file.path, file, on_bytes) != file.sha256):
                missing.append(file)

        if missing and self.offline:  # the cache's copy is damaged, and the hub may not be asked for another
            raise CheckFailed(f"{', '.join(f.path for f in missing)} of {self.ref} in the cache ({self.snapshot}): "
                              "not the sha256 ModelScope lists, and HF_HUB_OFFLINE is set: run the same command where "
                              "the hub is reachable to download afresh")
        counted = threading.Lock()

        def received(n: int) -> None:
            with counted:  # the client's threads report one at a time (a progress bar is not thread-safe)
                self.downloaded_bytes += n
                if on_bytes:
                    on_bytes(n)

        if missing:
            try:
                self.snapshot = Path(self.api.download_repo(
                    self.ref.repo_id, "model", revision=self.ref.revision, cache_dir=self.cache_dir,
                    file_list=[{"Path": f.path, "Size": f.size, "Sha256": f.sha256} for f in missing],
                    max_workers=self.options.max_workers, progress_callbacks=[_progress_callback(client, received)]))
            except client.errors.FileDownloadError as exc:
                corrupt = sorted(name for name, error in exc.failed_files.items()
                                 if isinstance(error, client.errors.FileIntegrityError))
                if corrupt:
                    raise CheckFailed(f"{', '.join(corrupt)} of {self.ref} from {self.endpoint} do not match the "
                                      "sha256 the hub lists, after the client's retries; deleted, nothing of them is "
                                      "kept") from None
                raise self._failed(f"downloading {self.ref} from {self.endpoint} failed", exc) from None
            except client.errors.HubError as exc:
                raise self._failed(f"downloading {self.ref} from {self.endpoint} failed", exc) from None
        self.record.path = str(self.snapshot)  # the client may reuse an older SDK's folder for this repo
        for file in self.files:
            self.record.add(file, verified_at=now_iso())
        save_record(self.record)
        return self.snapshot


def _progress_callback(client: Any, on_bytes: Callable[[int], None]) -> type:
    class Progress(client.ProgressCallback):  # type: ignore[misc, name-defined]
        """Feeds vlhub's progress bar (the client makes one instance per file)."""

        def update(self, size: int) -> None:
            on_bytes(size)

    return Progress
