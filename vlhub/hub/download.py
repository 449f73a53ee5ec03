"""Downloads into the hub clients' own caches: resumable across runs, every file checked against the hash the
hub lists for it, one process at a time per model and revision, nothing written outside the model's folder.

    with open_download("qwen2-vl-7b") as download:      # lists, checks names and free disk, under the lock
        path = download.fetch(on_bytes=advance)          # the snapshot directory

Hugging Face: the listing is huggingface_hub's (`HfApi`), and so is the HTTP client the files come through
(`get_session()`, so HF_ENDPOINT, HF_HOME and HF_TOKEN apply), but the transfer loop and the partial file are
ours (`vlhub.hub.transfer`): huggingface_hub >= 1.18 deletes its partial file on any failure, so it can only resume
within a run, and its `http_get` re-joins every byte into 10 MiB chunks on the thread that receives. vlhub keeps
`blobs/<hash>.incomplete`, resumes it with a Range request in the next run, hashes on another thread while receiving,
and only then renames it to `blobs/<hash>` and links `snapshots/<commit>/<path>` to it, which is the cache layout
the client itself reads.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from vlhub.atomic import ensure_free_space
from vlhub.catalog import find_model
from vlhub.errors import CheckFailed, UserError, VlhubError
from vlhub.faults import commit_point
from vlhub.formats.writers import hash_file_into
from vlhub.hub.records import DownloadRecord, RemoteFile, RepoRef, load_record, save_record
from vlhub.hub.transfer import Cancelled, ShortBody, receive
from vlhub.owned import lock_open_file, sweep, temporary_name
from vlhub.units import format_size, now_iso

SOURCES = ("huggingface", "modelscope")
# seconds to wait before each new attempt after a connection error, a 5xx or a 429 (then give up)
RETRY_DELAYS = (1, 2, 4, 8)
DOWNLOAD_WORKERS = 4  # files transferred at once


class DownloadFailed(VlhubError):
    """The hub could not be reached or kept failing after every retry (exit 2)."""


def resolve_repo(model: str, source: str = "huggingface", revision: str | None = None) -> RepoRef:
    """A catalog name or repo id as the repo to fetch from `source`."""
    if source not in SOURCES:
        raise UserError(f"--source {source!r}: choose huggingface or modelscope")
    spec = find_model(model)
    if spec is not None and spec.tiny:
        raise UserError(f"{spec.name} is built in: vlhub generates it locally on first use, there is nothing to "
                        f"download (`vlhub cache path {spec.name}` prints where it is)")
    if spec is not None:
        repo_id = spec.usable().hf_repo if source == "huggingface" else spec.modelscope_repo
    else:
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        repo_id = model.strip()
        try:
            validate_repo_id(repo_id)
            valid = repo_id.count("/") == 1
        except HFValidationError:
            valid = False
        if not valid:
            raise UserError(f"{model!r} is neither a catalog model nor a repo id like Qwen/Qwen2-VL-7B-Instruct "
                            "(`vlhub models` lists the catalog)")
    assert repo_id is not None
    default_revision = "main" if source == "huggingface" else "master"
    return RepoRef(source, repo_id, revision or default_revision, spec.name if spec else repo_id)


def checked_files(files: list[RemoteFile], ref: RepoRef, include: list[str] | None,
                  exclude: list[str] | None) -> list[RemoteFile]:
    """The files --include/--exclude select; any whose name would land outside the model's folder stops the run."""
    from huggingface_hub.utils import filter_repo_objects

    chosen = list(filter_repo_objects(files, allow_patterns=include or None, ignore_patterns=exclude or None,
                                      key=lambda f: f.path))
    for file in chosen:
        refuse_unsafe_name(file.path, ref)
        # hashes name files in the cache, so they are untrusted names too; and without one nothing can be checked
        if not (re.fullmatch(r"[0-9a-f]{64}", file.sha256 or "") or
                (file.sha256 is None and re.fullmatch(r"[0-9a-f]{40}", file.blob_id or ""))):
            raise UserError(f"{ref} lists {file.path!r} with no valid hash (sha256 {file.sha256!r}, blob id "
                            f"{file.blob_id!r}); refusing to download from this repo")
    if not chosen:
        raise UserError(f"no file of {ref} matches --include/--exclude ({len(files)} files listed)")
    return chosen


def refuse_unsafe_name(name: str, ref: RepoRef) -> None:
    """Remote names are untrusted: an absolute path, `..`, a backslash or a NUL could escape the model's folder."""
    parts = PurePosixPath(name).parts
    if (not name or name.startswith("/") or "\\" in name or "\0" in name or ".." in parts
            or any(p in ("", ".") for p in name.split("/"))):
        raise UserError(f"{ref} lists a file named {name!r}, which would land outside the model's folder; "
                        "refusing to download from this repo")


def in_parallel(action: Callable[[RemoteFile, threading.Event], None], files: list[RemoteFile]) -> None:
    """Run `action(file, cancel)` for each file on DOWNLOAD_WORKERS threads (several connections, as the hub
    clients use). The first error sets `cancel`, so the other transfers stop at their next piece, and is
    raised here. The threads are daemons: Ctrl-C returns at once, and what they wrote stays for a resume."""
    cancel = threading.Event()
    pending: queue.SimpleQueue[RemoteFile] = queue.SimpleQueue()
    for file in files:
        pending.put(file)
    errors: list[BaseException] = []

    def work() -> None:
        while not cancel.is_set():
            try:
                file = pending.get_nowait()
            except queue.Empty:
                return
            try:
                action(file, cancel)
            except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
                errors.append(exc)
                cancel.set()

    workers = [threading.Thread(target=work, name="download", daemon=True)
               for _ in range(max(1, min(DOWNLOAD_WORKERS, len(files))))]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    except BaseException:
        cancel.set()
        raise
    failures = [e for e in errors if not isinstance(e, Cancelled)]
    if failures:
        raise failures[0]


def file_digest(file: RemoteFile) -> Callable[[], Any]:
    """A fresh hash object for what the hub lists: sha256 for LFS files, else git's blob sha1."""
    if file.sha256:
        return hashlib.sha256

    def git_blob_sha1() -> Any:
        return hashlib.sha1(b"blob %d\0" % file.size)

    return git_blob_sha1


def hash_file(path: Path, file: RemoteFile, on_bytes: Callable[[int], None] | None = None) -> str:
    """The hash of a file on disk, of the kind the hub lists for `file`."""
    return hash_file_into(path, file_digest(file)(), on_bytes).hexdigest()


def retrying(action: Callable[[], Any], what: str, ref: RepoRef, endpoint: str) -> Any:
    """Run `action`, again after each back-off delay on a connection error, a 5xx or a 429."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    for delay in (*RETRY_DELAYS, None):
        try:
            return action()
        except Exception as exc:
            status = exc.response.status_code if isinstance(exc, HfHubHTTPError) and exc.response is not None else None
            # a dropped or refused connection, a short body, a rate limit, a server error
            transient = (isinstance(exc, (_transport_error(), ShortBody)) or status in (408, 429)
                         or (status or 0) >= 500)
            if not transient:
                if isinstance(exc, GatedRepoError):
                    raise UserError(f"{ref} is gated: accept its terms on the hub and set HF_TOKEN") from exc
                if isinstance(exc, HfHubHTTPError) and not isinstance(exc, (RepositoryNotFoundError,
                                                                            RevisionNotFoundError)):
                    raise DownloadFailed(f"{what} of {ref} from {endpoint} failed: {one_line(exc)}") from exc
                raise
            if delay is None:
                raise DownloadFailed(f"{what} of {ref} from {endpoint} failed after {len(RETRY_DELAYS) + 1} "
                                     f"attempts: {one_line(exc)}; run the same command again to resume") from exc
            time.sleep(delay)
    raise AssertionError("unreachable")


def _transport_error() -> type[Exception]:
    try:  # huggingface_hub 2.x
        import httpx2 as httpx
    except ImportError:  # 1.x
        import httpx  # type: ignore[no-redef]
    return httpx.TransportError


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class HuggingFaceDownload:
    """A Hugging Face repo revision fetched into the Hugging Face cache (HF_HOME / HF_HUB_CACHE)."""

    def __init__(self, ref: RepoRef, include: list[str] | None, exclude: list[str] | None,
                 endpoint: str | None) -> None:
        from huggingface_hub import constants

        self.ref = ref
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self.storage = hf_storage_folder(ref.repo_id)
        self.downloaded_bytes = 0
        self.filtered = bool(include or exclude)
        if constants.HF_HUB_OFFLINE:
            self._prepare_offline(include, exclude)
        else:
            self._prepare(include, exclude)

    def _prepare(self, include: list[str] | None, exclude: list[str] | None) -> None:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
        from huggingface_hub.hf_api import RepoFile

        api = HfApi(endpoint=self.endpoint)
        try:
            info = retrying(lambda: api.model_info(self.ref.repo_id, revision=self.ref.revision),
                            "reading the revision", self.ref, self.endpoint)
            self.commit = info.sha
            listing = retrying(lambda: list(api.list_repo_tree(self.ref.repo_id, revision=self.commit,
                                                                 recursive=True)),
                               "listing the files", self.ref, self.endpoint)
        except RevisionNotFoundError:
            raise UserError(f"{self.ref.repo_id} has no revision {self.ref.revision!r} on {self.endpoint}") from None
        except RepositoryNotFoundError:
            raise UserError(f"{self.endpoint} has no repo {self.ref.repo_id} (or it is private: set "
                            "HF_TOKEN)") from None
        listed = [RemoteFile(e.path, e.size, e.lfs.sha256 if e.lfs else None, e.blob_id)
                  for e in listing if isinstance(e, RepoFile)]
        self.files = checked_files(listed, self.ref, include, exclude)
        self.record = load_record(self.ref.source, self.ref.repo_id, self.commit) or DownloadRecord.new(
            self.ref, self.commit, self.storage / "snapshots" / self.commit, self.endpoint, self.filtered)
        to_fetch = {f.etag: f for f in self.files if not self._have_blob(f)}  # equal files share one blob
        self.missing_bytes = sum(f.size - self._partial_size(f) for f in to_fetch.values())
        ensure_free_space(self.storage, self.missing_bytes,
                          f"the {len(self.files)} files of {self.ref} ({format_size(self.total_bytes)}; what is "
                          "not yet in the cache)")

    def _prepare_offline(self, include: list[str] | None, exclude: list[str] | None) -> None:
        commit_file = self.storage / "refs" / self.ref.revision
        self.commit = commit_file.read_text().strip() if commit_file.is_file() else self.ref.revision
        record = load_record(self.ref.source, self.ref.repo_id, self.commit)
        if record is None or not (self.storage / "snapshots" / self.commit).is_dir():
            raise UserError(f"HF_HUB_OFFLINE is set and {self.ref} was not downloaded by vlhub into "
                            f"{self.storage.parent}; unset HF_HUB_OFFLINE to download it")
        self.record = record
        self.files = checked_files(record.remote_files(), self.ref, include, exclude)
        self.missing_bytes = 0
        missing = [f.path for f in self.files if not self._have_blob(f)]
        if record.filtered and not self.filtered:
            missing.append("(the files its --include/--exclude left out)")
        if missing:
            raise UserError(f"HF_HUB_OFFLINE is set and {len(missing)} files of {self.ref} are not in the cache "
                            f"(first: {missing[0]}); unset HF_HUB_OFFLINE to download them")

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def _blob(self, file: RemoteFile) -> Path:
        return self.storage / "blobs" / file.etag

    def _partial(self, file: RemoteFile) -> Path:
        return self.storage / "blobs" / f"{file.etag}.incomplete"

    def _have_blob(self, file: RemoteFile) -> bool:
        blob = self._blob(file)
        return blob.is_file() and blob.stat().st_size == file.size

    def _partial_size(self, file: RemoteFile) -> int:
        partial = self._partial(file)
        size = partial.stat().st_size if partial.is_file() else 0
        return size if size <= file.size else 0  # longer than the file: not a prefix of it, started afresh

    def fetch(self, on_bytes: Callable[[int], None] | None = None) -> Path:
        """Download what is missing (DOWNLOAD_WORKERS files at a time), check every file against its listed
        hash, link the snapshot."""
        counted = threading.Lock()

        def received(n: int) -> None:
            with counted:
                self.downloaded_bytes += n
            if on_bytes:
                on_bytes(n)

        to_fetch = {f.etag: f for f in self.files if not self._have_blob(f)}  # equal files share one blob
        in_parallel(lambda file, cancel: self._download(file, received, cancel), list(to_fetch.values()))
        snapshot = self.storage / "snapshots" / self.commit
        for folder in sorted({(snapshot / file.path).parent for file in self.files}):
            sweep(folder)  # links a killed run was making
        for file in self.files:
            if file.etag not in to_fetch and not self.record.verified(file) and not self._verified_blob(file):
                self._check_reused(file)
            self.record.add(file, verified_at=now_iso())
            _link(snapshot / file.path, self._blob(file))
        if self.ref.revision != self.commit:
            ref_file = self.storage / "refs" / self.ref.revision
            ref_file.parent.mkdir(parents=True, exist_ok=True)
            sweep(ref_file.parent)
            temporary = temporary_name(ref_file)
            temporary.write_text(self.commit)
            commit_point("point a ref at its commit")
            os.replace(temporary, ref_file)
        if not self.filtered:
            self.record.filtered = False
        save_record(self.record)
        return snapshot

    def _verified_blob(self, file: RemoteFile) -> bool:
        """Whether a file with the same content was checked in this run (or is recorded as checked)."""
        return any(e["verified_at"] and (e["sha256"] or e["blob_id"]) == file.etag
                   for e in self.record.files.values())

    def _check_reused(self, file: RemoteFile) -> None:
        """A blob another client (or an earlier run) left: only its size was ever checked."""
        blob = self._blob(file)
        if hash_file(blob, file) != file.etag:
            blob.unlink()
            raise CheckFailed(f"{file.path} in the cache ({blob}) does not match the hash {self.endpoint} lists; "
                              "deleted it: run the same command again to download it afresh")

    def _download(self, file: RemoteFile, on_bytes: Callable[[int], None], cancel: threading.Event) -> None:
        from huggingface_hub import hf_hub_url

        url = hf_hub_url(self.ref.repo_id, file.path, revision=self.commit, endpoint=self.endpoint)
        for last_try in (False, True):  # bytes that fail their hash are fetched once more, from zero
            digest = retrying(lambda: self._transfer(url, file, on_bytes, cancel), f"downloading {file.path}",
                              self.ref, self.endpoint)
            if digest in (None, file.etag):
                return
            if last_try:
                kind = "sha256" if file.sha256 else "git blob sha1"
                raise CheckFailed(f"{file.path} of {self.ref} downloaded from {self.endpoint} does not match the "
                                  f"{kind} the hub lists ({file.etag[:16]}..., got {digest[:16]}...), twice; "
                                  "deleted it: the mirror or the connection corrupts it")

    def _transfer(self, url: str, file: RemoteFile, on_bytes: Callable[[int], None],
                  cancel: threading.Event) -> str | None:
        """Continue the partial file, hash it, and rename it to its blob if the hash is right (else delete it),
        all under an exclusive lock of the partial file: another revision's download may share this blob.
        Returns the hash, or None when another process completed the blob meanwhile."""
        blob, partial = self._blob(file), self._partial(file)
        partial.parent.mkdir(parents=True, exist_ok=True)
        with _locked_partial(partial) as handle:
            if self._have_blob(file):  # another download completed the blob meanwhile: no use for a partial
                partial.unlink()
                return None
            fd = handle.fileno()
            if os.fstat(fd).st_size > file.size:
                os.ftruncate(fd, 0)
            # the bytes an earlier attempt kept are hashed again (their hash was not kept), then continued
            kept = hash_file_into(partial, file_digest(file)())
            digest = receive(url, fd, os.fstat(fd).st_size, file.size, file_digest(file), kept, on_bytes,
                             cancel).hexdigest()
            if digest == file.etag:
                os.chmod(partial, 0o644)
                commit_point("publish a downloaded blob")
                os.replace(partial, blob)
            else:
                partial.unlink()
        return digest


def _locked_partial(partial: Path) -> BinaryIO:
    """The partial file, opened (created if missing) and locked for this process alone. The file may leave the path
    while this waits for its lock (renamed to its blob by another download, removed by `vlhub cache rm --stale`):
    then the one at the path now is opened instead."""
    while True:
        handle = os.fdopen(os.open(partial, os.O_RDWR | os.O_CREAT, 0o600), "r+b")
        try:
            lock_open_file(handle.fileno())
            with suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(handle.fileno()), os.stat(partial)):
                    return handle
        except BaseException:
            handle.close()
            raise
        handle.close()


def hf_storage_folder(repo_id: str) -> Path:
    """`models--org--name` in the Hugging Face hub cache."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")


def _link(pointer: Path, blob: Path) -> None:
    """snapshots/<commit>/<path> -> ../../blobs/<hash>, relative, as huggingface_hub links them; made under a
    temporary name and renamed over, since another process may be linking the same snapshot."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(blob, pointer.parent)
    if pointer.is_symlink() and os.readlink(pointer) == target:
        return
    temporary = temporary_name(pointer)
    temporary.unlink(missing_ok=True)
    try:
        os.symlink(target, temporary)
    except OSError:  # no symlinks here (Windows without developer mode): a copy, as the client does
        shutil.copyfile(blob, temporary)
    commit_point("link a snapshot file")
    os.replace(temporary, pointer)

