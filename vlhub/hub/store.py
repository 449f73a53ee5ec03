"""The managed cache: what vlhub downloaded (files in the hub clients' caches, records in $VLHUB_HOME/downloads),
the built-in tiny models it generated, and the conversions and deployment layouts it wrote:

    $VLHUB_HOME/artifacts/<model>/<revision>/<target>[+<option>=<value>...]/vlhub-manifest.json

Every entry can be listed, verified offline (blobs against the hash they are named by or the record, artifacts
against their manifest), located and removed.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vlhub.catalog import find_model, models
from vlhub.errors import CorruptCheckpoint, UserError
from vlhub.hub.download import hash_file
from vlhub.hub.home import remove_empty_parents, repo_id_of, safe_name, vlhub_home
from vlhub.hub.locks import lock_path, repo_lock_files
from vlhub.hub.records import DownloadRecord, RemoteFile, all_records, note_verified, remove_record, save_record
from vlhub.hub.sources import Source, hub_snapshot
from vlhub.manifest import MANIFEST, Manifest, listed_path, verdict_state
from vlhub.owned import exclusive_lock, lock_file_of, writing
from vlhub.units import now_iso, plural

if TYPE_CHECKING:
    from huggingface_hub import DeleteCacheStrategy

DOWNLOAD, BUILT_IN = "download", "built-in"


@dataclass
class CacheEntry:
    """One thing in the cache: a downloaded revision, a built-in model, or an artifact (kind = its target key)."""

    model: str
    revision: str
    kind: str
    source: str  # huggingface, modelscope, or vlhub (generated or converted here)
    path: Path
    size: int
    last_used: float | None
    verified: str  # verified, unverified, damaged, built in
    smoke: str | None = None  # artifacts: the recorded smoke verdict
    record: DownloadRecord | None = field(default=None, repr=False)
    repo_id: str | None = None  # downloads: the hub's repo

    @property
    def is_artifact(self) -> bool:
        return self.kind not in (DOWNLOAD, BUILT_IN)

    @property
    def id(self) -> str:
        """How `vlhub cache ls` names it: a download as `hf cache ls` does (`model/Qwen/Qwen2-VL-7B-Instruct`), a
        built-in model or an artifact by its model's name."""
        return f"model/{self.repo_id}" if self.repo_id else self.model

    def to_json(self) -> dict:
        return {"id": self.id, "model": self.model, "revision": self.revision, "kind": self.kind,
                "source": self.source, "path": str(self.path), "size_bytes": self.size, "last_used": self.last_used,
                "verified": self.verified, "smoke": self.smoke}


def target_key(target: str, options: dict[str, object]) -> str:
    """`paddle-inference`, or with the options that change what is written: `paddle+dtype=float16`."""
    extras = [f"{name}={safe_name(str(value))}"
              for name, value in sorted(options.items()) if value not in (None, False)]
    return "+".join([target, *extras])


def conversion_output(source: Source, target: str, options: dict[str, object]) -> Path:
    """Where a conversion goes without --out: into the cache for a catalog model or a hub snapshot (never into
    the hub's cache, whose client would take it for a revision), beside the source otherwise."""
    name = source.model.name if source.model else _snapshot_model(source.path) if source.path else "model"
    if name is not None:
        return vlhub_home() / "artifacts" / name / source.revision / target_key(target, options)
    assert source.path is not None
    base = source.path if source.path.is_dir() else source.path.parent
    return base.with_name(f"{base.name}-{target}")


def _snapshot_model(path: Path) -> str | None:
    """The model a hub cache snapshot holds: its catalog name, else `Org--Name`."""
    snapshot = hub_snapshot(path)
    if snapshot is None:
        return None
    folder = snapshot[0].removeprefix("models--")
    spec = find_model(folder.replace("--", "/", 1))
    return spec.name if spec else folder


def mark_used(path: Path) -> None:
    """Note that an artifact was used now (its manifest's modification time is the cache's "last used")."""
    manifest = path / MANIFEST
    if manifest.is_file():
        os.utime(manifest)


def list_entries(model: str | None = None) -> list[CacheEntry]:
    """Every cache entry, or those of one model (catalog name or repo id)."""
    entries = [*_downloads(), *_built_in(), *_artifacts()]
    if model is not None:
        entries = [e for e in entries if names_model(e.model, model)]
    return entries


def names_model(name: str, model: str) -> bool:
    """Whether `name` (a catalog name or repo id, as the cache lists them) is the `model` a user typed: either of
    those, or the id `hf cache ls` and `vlhub cache ls` print (`model/Qwen/Qwen2-VL-7B-Instruct`)."""
    typed = model_of_id(model)
    spec = find_model(typed)
    wanted = spec.name if spec else typed
    return name.lower() == wanted.lower()


def model_of_id(text: str) -> str:
    """A catalog name or repo id as typed, with the `model/` of a cache id removed; other repo types refused."""
    kind, _, rest = text.strip().partition("/")
    if kind in ("dataset", "datasets", "space", "spaces", "kernel", "kernels") and rest.count("/") == 1:
        raise UserError(f"{text}: vlhub's cache holds models only (`hf cache ls` lists the rest)")
    return rest if kind in ("model", "models") and rest.count("/") == 1 else text.strip()


def catalog_name(repo_id: str) -> str:
    """How the cache names a repo's model: its catalog name, else the repo id."""
    spec = find_model(repo_id)
    return spec.name if spec else repo_id


def _downloads() -> list[CacheEntry]:
    entries, recorded = [], set()
    for record in all_records():
        recorded.add((record.repo_id, record.commit))
        files = [Path(record.path) / name for name in record.files]
        present = [f for f in files if f.exists()]
        if record.damaged:
            verified = f"damaged ({plural(len(record.damaged), 'file')})"
        elif len(present) < len(files):
            verified = f"incomplete ({len(files) - len(present)} missing)"
        else:
            verified = "verified" if all(e.verified_at for e in record.files.values()) else "unverified"
            if record.filtered:
                verified += " (--include/--exclude subset)"
        last_used = max((f.stat().st_atime for f in present), default=None)
        entries.append(CacheEntry(record.model, record.commit, DOWNLOAD, record.source, Path(record.path),
                                  record.total_bytes, last_used, verified, record=record, repo_id=record.repo_id))
    # catalog models other tools put in the Hugging Face cache: listed, and verifiable by their blob names
    for repo, revision in _hf_cached_catalog_revisions():
        if (repo.repo_id, revision.commit_hash) not in recorded:
            entries.append(CacheEntry(catalog_name(repo.repo_id), revision.commit_hash, DOWNLOAD, "huggingface",
                                      Path(revision.snapshot_path), revision.size_on_disk, repo.last_accessed,
                                      "unverified", repo_id=repo.repo_id))
    return entries


def _hf_cached_catalog_revisions() -> Iterable[tuple]:
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.utils import CacheNotFound

    repos = {spec.hf_repo for spec in models().values() if spec.hf_repo}
    try:
        info = scan_cache_dir(constants.HF_HUB_CACHE)
    except CacheNotFound:
        return []
    return [(repo, revision) for repo in info.repos if repo.repo_type == "model" and repo.repo_id in repos
            for revision in repo.revisions if re.fullmatch(r"[0-9a-f]{40}", revision.commit_hash)]


def _built_in() -> list[CacheEntry]:
    entries = []
    for path in sorted((vlhub_home() / "tiny").glob("v*/*")):
        if (path / "config.json").is_file():
            entries.append(CacheEntry(path.name, f"builtin-{path.parent.name}", BUILT_IN, "vlhub", path,
                                      _tree_size(path), (path / "config.json").stat().st_atime, "built in"))
    return entries


def reusable_artifact(artifact: Path) -> Manifest | None:
    """The manifest of a cached artifact that can be answered with: complete, and not found damaged."""
    manifest = Manifest.read(artifact)
    if manifest is None or not (manifest.cache_verify or {}).get("ok", True):
        return None
    return manifest


def _artifacts() -> list[CacheEntry]:
    entries = []
    for manifest_path in sorted((vlhub_home() / "artifacts").glob(f"*/*/*/{MANIFEST}")):
        path = manifest_path.parent
        manifest = Manifest.read(path)
        check = manifest.cache_verify if manifest else {"ok": False, "damaged": [MANIFEST]}
        verified = ("unverified" if not check else "verified" if check["ok"] else
                    f"damaged ({plural(len(check['damaged']), 'file')})")
        smoke_state = verdict_state(manifest.smoke if manifest else None)
        model, revision = path.parent.parent.name, path.parent.name
        entries.append(CacheEntry(model, revision, path.name, "vlhub", path, _tree_size(path),
                                  manifest_path.stat().st_mtime, verified, smoke_state))
    return entries


def _tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def find_entry(model: str, target: str | None = None) -> CacheEntry | None:
    """The entry `vlhub cache path` prints: the model's download (or built-in model), or its artifact for `target`
    (the key exactly, e.g. `paddle+dtype=float16`, else any options of that target); the most recently used."""
    entries = list_entries(model)
    if target is None:
        chosen = [e for e in entries if not e.is_artifact]
    else:
        chosen = [e for e in entries if e.kind == target] or [e for e in entries if e.kind.split("+")[0] == target]
    return max(chosen, key=lambda e: e.last_used or 0, default=None)


def cached_artifact(model: str, target: str | None = None) -> Path:
    """The cached conversion of catalog `model` that `vlhub smoke MODEL [--target T]` means: the one of `target`
    (the most recently used), or the only target cached when none is named."""
    artifacts = [e for e in list_entries(model) if e.is_artifact]
    if target is not None:
        entry = find_entry(model, target)
        if entry is None:
            raise UserError(f"no {target} conversion of {model} in the cache: `vlhub convert {model} --to "
                            f"{target.split('+')[0]}` makes one")
        return entry.path
    targets = sorted({e.kind.split("+")[0] for e in artifacts})
    if not targets:
        raise UserError(f"no conversion of {model} in the cache: `vlhub convert {model} --to TARGET` makes one, "
                        "or give the path of a converted checkpoint")
    if len(targets) > 1:
        raise UserError(f"{model} has cached conversions to {', '.join(targets)}: pass --target with one of them")
    return max(artifacts, key=lambda e: e.last_used or 0).path


def select_entries(model: str, target: str | None = None) -> list[CacheEntry]:
    """The entries `vlhub cache rm` removes: all of a model's, or those of one target (or `download`)."""
    entries = list_entries(model)
    if target is None:
        return entries
    if target == DOWNLOAD:
        return [e for e in entries if not e.is_artifact]
    return [e for e in entries if e.kind == target or e.kind.split("+")[0] == target]


@contextmanager
def entries_to_remove(model: str, target: str | None = None) -> Iterator[list[CacheEntry]]:
    """The entries `vlhub cache rm` removes (see `select_entries`), held for the block (see `holding`)."""
    with holding(select_entries(model, target), f"{model} in the cache") as held:
        yield held


@contextmanager
def holding(listed: list[CacheEntry], what: str) -> Iterator[list[CacheEntry]]:
    """`listed`, held for the block by the locks their writers take: while a download or conversion of one runs, or
    another `cache rm` or `cache prune` holds one, `Busy` names that process at once. Entries another process
    removed before the locks were taken are left out."""
    with ExitStack() as locks:
        for lock in sorted({lock for entry in listed for lock in _writer_locks(entry)}):
            locks.enter_context(exclusive_lock(lock, wait=False, what=what))
        present = {e.path for e in list_entries()}
        yield [e for e in listed if e.path in present]
    for entry in listed:  # now that their lock files are gone too: an artifact's revision and model folders
        if entry.kind != DOWNLOAD and not entry.path.exists():
            remove_empty_parents(entry.path, 2)


def unreferenced(entries: list[CacheEntry]) -> list[CacheEntry]:
    """The Hugging Face downloads among `entries` that no branch or tag of their repo points at (what `hf cache
    prune` calls detached revisions: a commit downloaded by its hash, or a branch's former commit)."""
    found = []
    for entry in entries:
        if entry.kind != DOWNLOAD or entry.source != "huggingface":
            continue
        refs = entry.path.parent.parent / "refs"  # models--Org--Name/refs/<branch or tag>
        pointed = {f.read_text().strip() for f in refs.rglob("*") if f.is_file()} if refs.is_dir() else set()
        if entry.revision not in pointed:
            found.append(entry)
    return found


def freed_by(entries: list[CacheEntry]) -> int:
    """The bytes removing `entries` frees: a download's blobs that another revision shares stay."""
    freed = sum(e.size for e in entries if not (e.kind == DOWNLOAD and e.source == "huggingface"))
    by_cache: dict[Path, list[str]] = {}
    for e in entries:
        if e.kind == DOWNLOAD and e.source == "huggingface":
            by_cache.setdefault(_hf_cache_of(e), []).append(e.revision)
    for cache, commits in by_cache.items():
        strategy = _deletion(cache, commits)
        freed += strategy.expected_freed_size if strategy else 0
    return freed


def _deletion(cache: Path, commits: list[str]) -> DeleteCacheStrategy | None:
    """huggingface_hub's plan to delete those of `commits` still in the hub cache `cache` (one another client
    removed is left out: the client would log a warning for it); None when none is."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.utils import CacheNotFound

    try:
        info = scan_cache_dir(cache)
    except CacheNotFound:
        return None
    present = {revision.commit_hash for repo in info.repos for revision in repo.revisions}
    there = [commit for commit in commits if commit in present]
    return info.delete_revisions(*there) if there else None


def _hf_cache_of(entry: CacheEntry) -> Path:
    """The hub cache a download is in: …/<cache>/models--Org--Name/snapshots/<commit>."""
    return entry.path.parents[2]


def _writer_locks(entry: CacheEntry) -> list[Path]:
    """The locks a writer of `entry` holds: any download of its repo's, or the lock beside a generated folder."""
    if entry.kind != DOWNLOAD:
        return [lock_file_of(entry.path)]
    record = entry.record  # None for another client's snapshot: …/models--Org--Name/snapshots/<commit>
    repo_id = record.repo_id if record else repo_id_of(entry.path.parent.parent.name)
    revision = record.revision if record else entry.revision
    return [lock_path(entry.source, repo_id, revision), *repo_lock_files(entry.source, repo_id)]


def remove_entry(entry: CacheEntry) -> None:
    """Delete an entry's files (a download through the hub client's own cache bookkeeping) and its record; inside
    `entries_to_remove`."""
    _remove_files(entry)
    if entry.record is not None:
        remove_record(entry.record)


def _remove_files(entry: CacheEntry) -> None:
    if entry.kind == DOWNLOAD and entry.source == "huggingface":
        # the cache it is in: HF_HUB_CACHE, or the --cache-dir it was downloaded into
        strategy = _deletion(_hf_cache_of(entry), [entry.revision])
        if strategy is not None:
            strategy.execute()
        repo_folder = entry.path.parent.parent  # models--Org--Name, above snapshots/<commit>
        if repo_folder.is_dir() and not any((repo_folder / "snapshots").glob("*")):
            shutil.rmtree(repo_folder, ignore_errors=True)  # left: partial files of an interrupted download
    else:
        shutil.rmtree(entry.path, ignore_errors=True)


@dataclass
class VerifyResult:
    entry: CacheEntry
    checked: int = 0  # files hashed
    damaged: list[str] = field(default_factory=list)  # "<file>: <what is wrong>"
    skipped: str | None = None

    @property
    def ok(self) -> bool:
        return not self.damaged


def verify_bytes(entry: CacheEntry) -> int:
    """How many bytes verifying `entry` reads (for a progress bar)."""
    return 0 if entry.kind == BUILT_IN else entry.size


def verify_entry(entry: CacheEntry, on_bytes: Callable[[int], None] | None = None) -> VerifyResult:
    """Re-hash an entry offline and record the outcome (download record, or artifact manifest), holding the lock its
    writers take: a download of it is waited for, a conversion writing it makes this fail at once."""
    if entry.kind == BUILT_IN:
        return VerifyResult(entry, skipped="built in: generated locally, nothing was downloaded")
    if entry.is_artifact:
        with writing(entry.path):
            return _verify_artifact(entry, on_bytes)
    if entry.record is not None:
        record = entry.record
        with exclusive_lock(lock_path(record.source, record.repo_id, record.revision)):
            return _verify_recorded(entry, record, on_bytes)
    return _verify_hf_blobs(entry, on_bytes)


def _verify_recorded(entry: CacheEntry, record: DownloadRecord, on_bytes: Callable[[int], None] | None) -> VerifyResult:
    result = VerifyResult(entry)
    for file in record.remote_files():
        path = Path(record.path) / file.path
        problem = _file_problem(path, file, on_bytes)
        result.checked += 1
        if problem:
            result.damaged.append(f"{file.path}: {problem}")
        else:
            record.add(file, verified_at=now_iso())
    record.damaged = sorted(d.split(": ")[0] for d in result.damaged)
    save_record(record)
    return result


def _verify_hf_blobs(entry: CacheEntry, on_bytes: Callable[[int], None] | None) -> VerifyResult:
    """A revision another client downloaded: each blob is named by its hash (sha256, or git's sha1)."""
    result = VerifyResult(entry)
    for path in sorted(p for p in entry.path.rglob("*") if p.is_file()):
        blob = path.resolve()
        name = blob.name
        if not re.fullmatch(r"[0-9a-f]{64}|[0-9a-f]{40}", name):
            continue  # a copy in no-symlink mode: no hash to check against
        size = blob.stat().st_size
        file = RemoteFile(str(path.relative_to(entry.path)), size, name if len(name) == 64 else None,
                          name if len(name) == 40 else None)
        result.checked += 1
        problem = _file_problem(path, file, on_bytes)
        if problem:
            result.damaged.append(f"{file.path}: {problem}")
    return result


def _file_problem(path: Path, file: RemoteFile, on_bytes: Callable[[int], None] | None) -> str | None:
    if not path.exists():
        return "missing"
    size = path.stat().st_size
    if size != file.size:
        return f"size {size}, expected {file.size}"
    kind = "sha256" if file.sha256 else "git blob sha1"
    return None if hash_file(path, file, on_bytes) == file.etag else f"{kind} differs from {file.etag[:16]}..."


def manifest_problems(directory: Path, manifest: Manifest, on_bytes: Callable[[int], None] | None = None) -> list[str]:
    """"<file>: <what is wrong>" for each file the manifest lists that is missing or differs in size or sha256. A
    listed file leading outside `directory` is refused (CorruptCheckpoint) before any file is hashed."""
    paths = {name: listed_path(directory, name) for name in sorted(manifest.files)}
    problems = []
    for name, path in paths.items():
        expected = manifest.files[name]
        problem = _file_problem(path, RemoteFile(name, expected.size, expected.sha256, None), on_bytes)
        if problem:
            problems.append(f"{name}: {problem}")
    return problems


def _verify_artifact(entry: CacheEntry, on_bytes: Callable[[int], None] | None) -> VerifyResult:
    result = VerifyResult(entry)
    manifest = Manifest.read(entry.path)
    if manifest is None:
        result.damaged.append(f"{MANIFEST}: unreadable")
        return result
    result.checked = len(manifest.files)
    try:
        result.damaged = manifest_problems(entry.path, manifest, on_bytes)
    except CorruptCheckpoint as exc:  # a listed file leads out of the entry: damaged, and nothing in it is hashed
        result.damaged = [str(exc)]
    note_verified(entry.path, manifest, result.damaged)
    return result

