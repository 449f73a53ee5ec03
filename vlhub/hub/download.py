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

import errno
import hashlib
import os
import queue
import re
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from vlhub.atomic import ensure_free_space
from vlhub.catalog import find_model
from vlhub.errors import CheckFailed, UserError, VlhubError
from vlhub.faults import commit_point
from vlhub.formats.writers import hash_file_into
from vlhub.hub.home import is_repo_id
from vlhub.hub.records import DownloadRecord, RemoteFile, RepoRef, load_record, save_record
from vlhub.hub.transfer import Cancelled, ShortBody, receive
from vlhub.owned import lock_open_file, sweep, temporary_name
from vlhub.units import format_size, now_iso, plural

SOURCES = ("huggingface", "modelscope")
# seconds to wait before each new attempt after a dropped connection, a 5xx or a 429 (then give up)
RETRY_DELAYS = (1, 2, 4, 8)
DOWNLOAD_WORKERS = 4  # files transferred at once (`--max-workers`; hf download's default is 8)
PROBE_SECONDS = 5  # a hub that does not accept a connection within this is unreachable
HF_DEFAULT_ENDPOINT = "https://huggingface.co"  # huggingface_hub's, without HF_ENDPOINT
NETWORK_EXIT = 3  # the exit code of a hub that cannot be reached or keeps failing (docs/download-and-cache.md)


class DownloadFailed(VlhubError):
    """The hub kept failing (5xx, dropped connections) after every retry: exit 3, the next run resumes."""

    exit_code = NETWORK_EXIT


class HubUnreachable(VlhubError):
    """No connection to the hub could be made at all (DNS, refused, TLS, no route): exit 3 at once, not retried."""

    exit_code = NETWORK_EXIT


@dataclass(frozen=True)
class DownloadOptions:
    """`hf download`'s options, with the same meanings: which files (FILENAMES, or --include/--exclude), where to
    (the hub cache, another cache directory, or plain files in a local directory), how (token, forced, workers),
    and whether only to list what would be fetched."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    filenames: tuple[str, ...] = ()  # explicit files; a name ending in / is a folder
    token: str | None = None
    force: bool = False
    max_workers: int = DOWNLOAD_WORKERS
    cache_dir: Path | None = None
    local_dir: Path | None = None
    dry_run: bool = False
    on_retry: Callable[[str], None] | None = None  # told "retrying in 4 s (attempt 2/5): ..." before each wait

    @property
    def patterns(self) -> tuple[list[str] | None, list[str] | None]:
        """(allow, ignore) globs, as `hf download` makes them: FILENAMES replace --include/--exclude, a folder
        `art/` becomes `art/**`."""
        if self.filenames:
            return [f"{name.rstrip('/')}/**" if name.endswith("/") else name for name in self.filenames], None
        return list(self.include) or None, list(self.exclude) or None

    @property
    def filtered(self) -> bool:
        return bool(self.filenames or self.include or self.exclude)


EVERYTHING = DownloadOptions()  # the whole revision into the hub cache, as `hf download REPO_ID` fetches it


def unreachable_reason(exc: BaseException | None) -> str | None:
    """Why no connection could be made, when that is not worth retrying: the host name does not resolve, the
    connection is refused, TLS fails, there is no route; None for anything else (a dropped connection, a 5xx)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, socket.gaierror):
            return f"its host name does not resolve: {exc.strerror or exc}"
        if isinstance(exc, ConnectionRefusedError):
            return "the connection was refused"
        if isinstance(exc, ssl.SSLError):
            return f"TLS failed: {getattr(exc, 'verify_message', None) or exc.reason or exc}"
        if isinstance(exc, OSError) and exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return "there is no route to it"
        if isinstance(exc, _connect_timeout()):
            return "it did not answer the connection"
        if isinstance(exc, _httpx().ProxyError):  # the proxy answered CONNECT with a refusal (407, 403): not transient
            return f"the proxy refused: {one_line(exc)}"
        exc = exc.__cause__ or exc.__context__
    return None


def proxy_for(endpoint: str) -> tuple[str, str] | None:
    """(the proxy's URL, the variable naming it) when the environment sends connections to `endpoint` through a
    proxy (HTTPS_PROXY / HTTP_PROXY, not bypassed by NO_PROXY), as the hub clients do; None for a direct one."""
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    parts = urlsplit(endpoint)
    proxy = getproxies().get(parts.scheme)
    if proxy is None or proxy_bypass(parts.hostname or ""):
        return None
    if "://" not in proxy:  # `host:port`, as httpx and requests read it
        proxy = "http://" + proxy
    return proxy, f"{parts.scheme.upper()}_PROXY"


def unreachable(endpoint: str, reason: str, ref: RepoRef) -> HubUnreachable:
    """The one-line error for a hub that cannot be reached, with the ways around it."""
    proxy = proxy_for(endpoint)
    if proxy is not None:  # the proxy is what failed, or at least what vlhub could not get past
        url, variable = proxy
        return HubUnreachable(f"the hub {endpoint} is unreachable through the proxy {url} ({variable}) ({reason}): "
                              f"check {variable}, or add the hub's host to NO_PROXY to connect directly")
    setting = _endpoint_setting(endpoint, ref.source)
    if setting is not None:  # a mirror the user chose is down: not "set a mirror" again, but check that one
        default = HF_DEFAULT_ENDPOINT if ref.source == "huggingface" else "ModelScope's own"
        other = ("give another mirror or drop it" if setting == "--endpoint"
                 else "set it to another mirror or unset it")
        headline = (f"the configured endpoint {endpoint} ({setting}) is unreachable ({reason}): check {setting}, "
                    f"{other} to use {default}")
    else:
        headline = f"the hub {endpoint} is unreachable ({reason}): set " + (
            "HF_ENDPOINT to a mirror (e.g. HF_ENDPOINT=https://hf-mirror.com)" if ref.source == "huggingface"
            else "MODELSCOPE_ENDPOINT (or --endpoint) to a reachable mirror")
    if ref.source == "huggingface":
        remedies = (f"fetch it from ModelScope (`vlhub download {ref.model} --source modelscope`) and give the "
                    "directory it prints, or give a local checkpoint directory, or set HF_HUB_OFFLINE=1 to use only "
                    "what is in the cache")
    else:
        remedies = ("download from the Hugging Face Hub (--source huggingface, HF_ENDPOINT for a mirror), or give a "
                    "local checkpoint directory")
    return HubUnreachable(f"{headline}, or {remedies}")


def _endpoint_setting(endpoint: str, source: str) -> str | None:
    """What chose the endpoint that failed: its environment variable, --endpoint, or None for the hub's default."""
    if source == "huggingface" and endpoint == HF_DEFAULT_ENDPOINT:
        return None
    variable = "HF_ENDPOINT" if source == "huggingface" else "MODELSCOPE_ENDPOINT"
    if os.environ.get(variable, "").rstrip("/") == endpoint:
        return variable
    # ModelScope's default is its client's: an endpoint not from the environment may be either, so it is not named
    return "--endpoint" if source == "huggingface" else None


def probe(endpoint: str, ref: RepoRef) -> None:
    """Connect to the hub's host once (or to the proxy the environment sends it through), within PROBE_SECONDS:
    HubUnreachable at once when that fails, before a client that retries every error by itself is handed the
    request (ModelScope's retries for 7 s)."""
    from urllib.parse import urlsplit

    proxy = proxy_for(endpoint)
    parts = urlsplit(proxy[0] if proxy else endpoint)  # through a proxy, only the proxy is connected to directly
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=PROBE_SECONDS).close()
    except OSError as exc:
        reason = unreachable_reason(exc) or (f"no connection within {PROBE_SECONDS} s" if isinstance(exc, TimeoutError)
                                             else one_line(exc))
        raise unreachable(endpoint, reason, ref) from None


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
        repo_id = model.strip()
        if not is_repo_id(repo_id):
            raise UserError(f"{model!r} is neither a catalog model nor a repo id like Qwen/Qwen2-VL-7B-Instruct "
                            "(`vlhub models` lists the catalog)")
    assert repo_id is not None
    default_revision = "main" if source == "huggingface" else "master"
    return RepoRef(source, repo_id, revision or default_revision, spec.name if spec else repo_id)


def checked_files(files: list[RemoteFile], ref: RepoRef, options: DownloadOptions) -> list[RemoteFile]:
    """The files FILENAMES or --include/--exclude select; any whose name would land outside the model's folder stops
    the run, and so does a named file the repo does not have."""
    from huggingface_hub.utils import filter_repo_objects

    include, exclude = options.patterns
    chosen = list(filter_repo_objects(files, allow_patterns=include, ignore_patterns=exclude, key=lambda f: f.path))
    listed = {f.path for f in files}
    absent = [name for name in options.filenames if not name.endswith("/") and name not in listed]
    if absent:
        raise UserError(f"{ref} has no file {absent[0]!r} ({len(files)} files listed; `vlhub download "
                        f"{ref.repo_id} --dry-run` lists them)")
    for file in chosen:
        refuse_unsafe_name(file.path, ref)
        # hashes name files in the cache, so they are untrusted names too; and without one nothing can be checked
        if not (re.fullmatch(r"[0-9a-f]{64}", file.sha256 or "") or
                (file.sha256 is None and re.fullmatch(r"[0-9a-f]{40}", file.blob_id or ""))):
            raise UserError(f"{ref} lists {file.path!r} with no valid hash (sha256 {file.sha256!r}, blob id "
                            f"{file.blob_id!r}); refusing to download from this repo")
    if not chosen:
        raise UserError(f"no file of {ref} matches {'FILENAMES' if options.filenames else '--include/--exclude'} "
                        f"({len(files)} files listed)")
    return chosen


def cached_record(record: DownloadRecord | None, ref: RepoRef, options: DownloadOptions,
                  cache: Path) -> DownloadRecord:
    """HF_HUB_OFFLINE: the record of the revision in `cache`, if there is one to answer from; else one line saying
    what to do (and --force-download, which needs the hub, refused)."""
    if options.force:
        raise UserError("HF_HUB_OFFLINE is set: --force-download downloads every file from the hub again; unset "
                        "HF_HUB_OFFLINE, or drop --force-download to use the cache's copy")
    if record is None:
        raise UserError(f"HF_HUB_OFFLINE is set and {ref} is not in the cache ({cache}): run `{_download_command(ref)}` "
                        "where the hub is reachable and copy the cache over, or unset HF_HUB_OFFLINE")
    return record


def offline_files(record: DownloadRecord, ref: RepoRef, options: DownloadOptions,
                  present: Callable[[RemoteFile], bool]) -> list[RemoteFile]:
    """HF_HUB_OFFLINE: the files FILENAMES or --include/--exclude select from what `record` lists, every one of them
    `present`; else one line naming what is missing."""
    files = checked_files(record.remote_files(), ref, options)
    if record.filtered and not options.filtered:
        raise UserError(f"HF_HUB_OFFLINE is set and only some files of {ref} are in the cache (downloaded "
                        f"with --include/--exclude): run `{_download_command(ref)}` where the hub is reachable, or "
                        "unset HF_HUB_OFFLINE")
    missing = [f.path for f in files if not present(f)]
    if missing:
        named = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UserError(f"HF_HUB_OFFLINE is set and {plural(len(missing), 'file')} of {ref} "
                        f"{'is' if len(missing) == 1 else 'are'} not in the cache ({named}): run "
                        f"`{_download_command(ref)}` where the hub is reachable, or unset HF_HUB_OFFLINE")
    return files


def _download_command(ref: RepoRef) -> str:
    return f"vlhub download {ref.model}" + (" --source modelscope" if ref.source == "modelscope" else "")


def refuse_unsafe_name(name: str, ref: RepoRef) -> None:
    """Remote names are untrusted: an absolute path, `..`, a backslash or a NUL could escape the model's folder."""
    parts = PurePosixPath(name).parts
    if (not name or name.startswith("/") or "\\" in name or "\0" in name or ".." in parts
            or any(p in ("", ".") for p in name.split("/"))):
        raise UserError(f"{ref} lists a file named {name!r}, which would land outside the model's folder; "
                        "refusing to download from this repo")


def in_parallel(action: Callable[[RemoteFile, threading.Event], None], files: list[RemoteFile],
                workers: int = DOWNLOAD_WORKERS) -> None:
    """Run `action(file, cancel)` for each file on `workers` threads (several connections, as the hub
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

    threads = [threading.Thread(target=work, name="download", daemon=True)
               for _ in range(max(1, min(workers, len(files))))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
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


def retrying(action: Callable[[], Any], what: str, ref: RepoRef, endpoint: str,
             on_retry: Callable[[str], None] | None = None) -> Any:
    """Run `action`, again after each back-off delay on a dropped connection, a 5xx or a 429 (each wait announced
    to `on_retry`). A hub that cannot be connected to at all fails at once (HubUnreachable), a refusal (401, 403,
    404) in one line (UserError)."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    attempts = len(RETRY_DELAYS) + 1
    for attempt, delay in enumerate((*RETRY_DELAYS, None), start=1):
        try:
            return action()
        except Exception as exc:
            reason = unreachable_reason(exc)
            if reason is not None:
                raise unreachable(endpoint, reason, ref) from exc
            status = exc.response.status_code if isinstance(exc, HfHubHTTPError) and exc.response is not None else None
            # a dropped connection, a short body, a rate limit, a server error
            transient = (isinstance(exc, (_transport_error(), ShortBody)) or status in (408, 429)
                         or (status or 0) >= 500)
            if not transient:
                if status == 401:
                    raise UserError(_token_refused(exc, ref, endpoint)) from exc
                if isinstance(exc, GatedRepoError):
                    raise UserError(f"{ref.repo_id} is gated and this token has no access to it: accept its terms on "
                                    f"{endpoint} with the account of --token / HF_TOKEN") from exc
                if isinstance(exc, HfHubHTTPError) and not isinstance(exc, (RepositoryNotFoundError,
                                                                            RevisionNotFoundError)):
                    raise UserError(f"{what} of {ref} from {endpoint} failed: {one_line(exc)}") from exc
                raise
            if delay is None:
                raise DownloadFailed(f"{what} of {ref} from {endpoint} failed after {attempts} attempts: "
                                     f"{one_line(exc)}; run the same command again to resume") from exc
            if on_retry is not None:
                on_retry(f"retrying in {delay} s (attempt {attempt + 1}/{attempts}): {what}: {_short(exc)}")
            time.sleep(delay)
    raise AssertionError("unreachable")


def _token_refused(exc: Exception, ref: RepoRef, endpoint: str) -> str:
    """A 401: no token, or one the hub does not take."""
    if "Invalid credentials" in str(exc) or "Invalid username or password" in str(exc):
        return f"{endpoint} refused the token (invalid credentials): check --token / HF_TOKEN"
    return f"{ref.repo_id} on {endpoint} is gated/needs a token: pass --token or set HF_TOKEN"


def _short(exc: Exception) -> str:
    """An error's first line: a retry notice stays one line (hub errors add the URL and advice on later lines)."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def _transport_error() -> type[Exception]:
    return _httpx().TransportError


def _connect_timeout() -> type[Exception]:
    return _httpx().ConnectTimeout


def _httpx() -> Any:
    try:  # huggingface_hub 2.x
        import httpx2 as httpx
    except ImportError:  # 1.x
        import httpx  # type: ignore[no-redef]
    return httpx


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class HuggingFaceDownload:
    """A Hugging Face repo revision fetched into the Hugging Face cache (HF_HOME / HF_HUB_CACHE, or --cache-dir),
    or with --local-dir as plain files in a directory, laid out as `hf download --local-dir` lays them out
    (`.cache/huggingface/download/` keeps each file's commit and hash, so either tool knows it is there)."""

    def __init__(self, ref: RepoRef, options: DownloadOptions, endpoint: str | None) -> None:
        from huggingface_hub import constants

        self.ref = ref
        self.options = options
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self.storage = hf_storage_folder(ref.repo_id, options.cache_dir)
        self.local_dir = options.local_dir
        self.downloaded_bytes = 0
        self.filtered = options.filtered
        if constants.HF_HUB_OFFLINE:
            self._prepare_offline()
        else:
            self._prepare()

    def _prepare(self) -> None:
        from huggingface_hub import HfApi, constants
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
        from huggingface_hub.hf_api import RepoFile

        api = HfApi(endpoint=self.endpoint, token=self.options.token)
        try:  # the client sets no timeout of its own here: a hub that accepts and never answers would hang the run
            info = retrying(lambda: api.model_info(self.ref.repo_id, revision=self.ref.revision,
                                                   timeout=constants.HF_HUB_ETAG_TIMEOUT),
                            "reading the revision", self.ref, self.endpoint, self.options.on_retry)
            self.commit = info.sha
            listing = retrying(lambda: list(api.list_repo_tree(self.ref.repo_id, revision=self.commit,
                                                                 recursive=True)),
                               "listing the files", self.ref, self.endpoint, self.options.on_retry)
        except RevisionNotFoundError:
            raise UserError(f"{self.ref.repo_id} has no revision {self.ref.revision!r} on {self.endpoint}") from None
        except RepositoryNotFoundError:
            raise UserError(f"{self.endpoint} has no repo {self.ref.repo_id} (or it is private: pass --token or set "
                            "HF_TOKEN)") from None
        listed = [RemoteFile(e.path, e.size, e.lfs.sha256 if e.lfs else None, e.blob_id)
                  for e in listing if isinstance(e, RepoFile)]
        self.files = checked_files(listed, self.ref, self.options)
        self.record = load_record(self.ref.source, self.ref.repo_id, self.commit) or DownloadRecord.new(
            self.ref, self.commit, self.storage / "snapshots" / self.commit, self.endpoint, self.filtered)
        if self.local_dir is not None:  # what the hub client itself would download there: a record of no use
            self.record = DownloadRecord.new(self.ref, self.commit, self.local_dir, self.endpoint, self.filtered)
        if self.options.dry_run:  # nothing written, not even a partial file's folder
            self.missing_bytes = sum(f.size for f in self._to_fetch())
            return
        self.missing_bytes = sum(f.size - self._partial_size(f) for f in self._to_fetch())
        where = "the directory" if self.local_dir else "the cache"
        ensure_free_space(self.local_dir or self.storage, self.missing_bytes,
                          f"the {len(self.files)} files of {self.ref} ({format_size(self.total_bytes)}; what is "
                          f"not yet in {where})")

    def _prepare_offline(self) -> None:
        """HF_HUB_OFFLINE: the revision as the cache has it (vlhub's record, else the snapshot another client
        left, each file checked against the hash its blob is named by); no connection is opened."""
        if self.local_dir is not None:  # what the directory's metadata notes, as hf download answers offline
            self.record = cached_record(_record_of_local_dir(self.ref, self.local_dir), self.ref, self.options,
                                        self.local_dir)
            self.commit = self.record.commit
            self.files = offline_files(self.record, self.ref, self.options, self._have_blob)
            self.missing_bytes = 0
            return
        commit_file = self.storage / "refs" / self.ref.revision
        self.commit = commit_file.read_text().strip() if commit_file.is_file() else self.ref.revision
        snapshot = self.storage / "snapshots" / self.commit
        record = load_record(self.ref.source, self.ref.repo_id, self.commit) or _record_of_snapshot(
            self.ref, self.commit, snapshot)
        self.record = cached_record(record if snapshot.is_dir() else None, self.ref, self.options,
                                    self.storage.parent)
        self.files = offline_files(self.record, self.ref, self.options, self._have_blob)
        self.missing_bytes = 0

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def _blob(self, file: RemoteFile) -> Path:
        if self.local_dir is not None:
            return self.local_dir / file.path
        return self.storage / "blobs" / file.etag

    def _partial(self, file: RemoteFile) -> Path:
        if self.local_dir is not None:
            from huggingface_hub._local_folder import get_local_download_paths

            return get_local_download_paths(self.local_dir, file.path).incomplete_path(file.etag)
        return self.storage / "blobs" / f"{file.etag}.incomplete"

    def _have_blob(self, file: RemoteFile) -> bool:
        blob = self._blob(file)
        if not (blob.is_file() and blob.stat().st_size == file.size):
            return False
        if self.local_dir is None:
            return True
        # a file of another revision or edited since it was written is downloaded again, as the client does
        from huggingface_hub._local_folder import read_download_metadata

        metadata = read_download_metadata(self.local_dir, file.path)
        return metadata is not None and metadata.etag == file.etag

    def _to_fetch(self) -> list[RemoteFile]:
        """What `fetch` transfers: each missing file (all of them with --force-download); in the cache equal files
        once (they share a blob), in --local-dir each at its own path."""
        missing = [f for f in self.files if self.options.force or not self._have_blob(f)]
        return list({f.path if self.local_dir else f.etag: f for f in missing}.values())

    def will_download(self, file: RemoteFile) -> bool:
        """Whether `fetch` transfers this file (for --dry-run)."""
        return self.options.force or not self._have_blob(file)

    @property
    def unchecked(self) -> list[RemoteFile]:
        """The files `fetch` hashes without transferring them: there already (another client's, an earlier run's
        whose record is gone), never checked by vlhub; equal contents once."""
        fetched = {f.etag for f in self._to_fetch()}
        return list({f.etag: f for f in self.files if f.etag not in fetched and not self.record.verified(f)
                     and not self._verified_blob(f)}.values())

    def _partial_size(self, file: RemoteFile) -> int:
        partial = self._partial(file)
        size = partial.stat().st_size if partial.is_file() else 0
        return size if size <= file.size and not self.options.force else 0  # else started afresh

    def fetch(self, on_bytes: Callable[[int], None] | None = None) -> Path:
        """Download what is missing (--max-workers files at a time), check every file against its listed hash,
        link the snapshot (with --local-dir: note each file's commit and hash beside it)."""
        counted = threading.Lock()

        def received(n: int) -> None:
            with counted:  # the transfers' threads report one at a time (a progress bar is not thread-safe)
                self.downloaded_bytes += n
                if on_bytes:
                    on_bytes(n)

        to_fetch = self._to_fetch()
        fetched = {f.etag for f in to_fetch}
        if self.options.force:  # from the first byte: what an earlier run kept is not reused either
            for file in to_fetch:
                self._partial(file).unlink(missing_ok=True)
        in_parallel(lambda file, cancel: self._download(file, received, cancel), to_fetch, self.options.max_workers)
        if self.local_dir is not None:
            return self._finish_local(fetched, on_bytes)
        snapshot = self.storage / "snapshots" / self.commit
        for folder in sorted({(snapshot / file.path).parent for file in self.files}):
            sweep(folder)  # links a killed run was making
        for file in self.files:
            self._check_unless_known(file, fetched, on_bytes)
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

    def _finish_local(self, fetched: set[str], on_bytes: Callable[[int], None] | None) -> Path:
        """--local-dir: each file checked, and its commit and hash noted as `hf download --local-dir` notes them."""
        from huggingface_hub._local_folder import write_download_metadata

        assert self.local_dir is not None
        for file in self.files:
            self._check_unless_known(file, fetched, on_bytes)
            write_download_metadata(self.local_dir, file.path, self.commit, file.etag)
        return self.local_dir

    def _check_unless_known(self, file: RemoteFile, fetched: set[str], on_bytes: Callable[[int], None] | None) -> None:
        """A file this run did not fetch, unless vlhub hashed it before: hashed now (only its size was checked)."""
        if file.etag not in fetched and not self.record.verified(file) and not self._verified_blob(file):
            self._check_reused(file, on_bytes)

    def _verified_blob(self, file: RemoteFile) -> bool:
        """Whether a file with the same content was checked in this run (or is recorded as checked)."""
        return any(e.verified_at and e.etag == file.etag for e in self.record.files.values())

    def _check_reused(self, file: RemoteFile, on_bytes: Callable[[int], None] | None) -> None:
        """A blob another client (or an earlier run) left: only its size was ever checked."""
        blob = self._blob(file)
        if hash_file(blob, file, on_bytes) != file.etag:
            blob.unlink()
            raise CheckFailed(f"{file.path} in the cache ({blob}) does not match the hash {self.endpoint} lists; "
                              "deleted it: run the same command again to download it afresh")

    def _download(self, file: RemoteFile, on_bytes: Callable[[int], None], cancel: threading.Event) -> None:
        from huggingface_hub import hf_hub_url

        url = hf_hub_url(self.ref.repo_id, file.path, revision=self.commit, endpoint=self.endpoint)
        for last_try in (False, True):  # bytes that fail their hash are fetched once more, from zero
            digest = retrying(lambda: self._transfer(url, file, on_bytes, cancel), f"downloading {file.path}",
                              self.ref, self.endpoint, self.options.on_retry)
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
            if not self.options.force and self._have_blob(file):  # another download completed it meanwhile
                partial.unlink()
                return None
            fd = handle.fileno()
            if os.fstat(fd).st_size > file.size:
                os.ftruncate(fd, 0)
            # the bytes an earlier attempt kept are hashed again (their hash was not kept), then continued
            kept = hash_file_into(partial, file_digest(file)())
            digest = receive(url, fd, os.fstat(fd).st_size, file.size, file_digest(file), kept, on_bytes,
                             cancel, self.options.token).hexdigest()
            if digest == file.etag:
                os.chmod(partial, 0o644)
                blob.parent.mkdir(parents=True, exist_ok=True)  # --local-dir: the file's own folder
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


def hf_storage_folder(repo_id: str, cache_dir: Path | None = None) -> Path:
    """`models--org--name` in the Hugging Face hub cache (HF_HUB_CACHE, or `cache_dir` as --cache-dir gives it)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    cache = Path(cache_dir or constants.HF_HUB_CACHE).expanduser().resolve()  # a relative HF_HOME too, as hf does
    return cache / repo_folder_name(repo_id=repo_id, repo_type="model")


def _record_of_snapshot(ref: RepoRef, commit: str, snapshot: Path) -> DownloadRecord | None:
    """A record of the snapshot another client left in the cache, each file's hash taken from its blob's name
    (sha256, or git's sha1), none of them verified yet; None without one."""
    if not snapshot.is_dir():
        return None
    record = DownloadRecord.new(ref, commit, snapshot, "", filtered=False)
    for path in sorted(p for p in snapshot.rglob("*") if p.is_file()):
        name = path.resolve().name
        if re.fullmatch(r"[0-9a-f]{64}|[0-9a-f]{40}", name):
            record.add(RemoteFile(path.relative_to(snapshot).as_posix(), path.stat().st_size,
                                  name if len(name) == 64 else None, name if len(name) == 40 else None), verified_at="")
    return record


def _record_of_local_dir(ref: RepoRef, local_dir: Path) -> DownloadRecord | None:
    """A record of the files `hf download --local-dir` (or vlhub) noted in `local_dir`, each with the hash its
    metadata gives, none verified yet: those of the revision's commit when it is a commit, else of the one commit
    noted; None when nothing is noted or several commits are."""
    from huggingface_hub._local_folder import read_download_metadata

    notes = local_dir / ".cache" / "huggingface" / "download"
    noted, changed = {}, []
    for metadata_file in sorted(notes.rglob("*.metadata")):
        name = metadata_file.relative_to(notes).as_posix().removesuffix(".metadata")
        metadata = read_download_metadata(local_dir, name)  # None when the file changed (or went) since
        if metadata is None:
            changed.append(name)
        else:
            noted[name] = metadata
    if changed:
        raise UserError(f"HF_HUB_OFFLINE is set and {plural(len(changed), 'file')} of {ref} in {local_dir} changed "
                        f"or went since {'it was' if len(changed) == 1 else 'they were'} downloaded "
                        f"({', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}): run `{_download_command(ref)} "
                        f"--local-dir {local_dir}` where the hub is reachable, or unset HF_HUB_OFFLINE")
    commits = {m.commit_hash for m in noted.values()}
    if re.fullmatch(r"[0-9a-f]{40}", ref.revision):
        commit = ref.revision if ref.revision in commits else None
    else:  # a branch or tag: which commit it names is not noted, only which commit the files came from
        commit = next(iter(commits)) if len(commits) == 1 else None
    if commit is None:
        return None
    record = DownloadRecord.new(ref, commit, local_dir, "", filtered=False)
    for name, metadata in noted.items():
        if metadata.commit_hash == commit and re.fullmatch(r"[0-9a-f]{64}|[0-9a-f]{40}", metadata.etag):
            sha256 = metadata.etag if len(metadata.etag) == 64 else None
            record.add(RemoteFile(name, (local_dir / name).stat().st_size, sha256, None if sha256 else metadata.etag),
                       verified_at="")
    return record


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

