"""What vlhub knows about the models it downloaded: one JSON record per repo revision under
$VLHUB_HOME/downloads/<source>/<org>--<name>/<commit>.json, listing each file with the hash the hub listed
and when vlhub last checked it. `vlhub cache verify` re-hashes against these; the files stay in the clients'
caches."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vlhub.formats.writers import write_json_atomic
from vlhub.hub.home import remove_empty_parents, vlhub_home
from vlhub.manifest import MANIFEST, Manifest
from vlhub.owned import sweep
from vlhub.units import now_iso


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repo as the hub lists it."""

    path: str
    size: int
    sha256: str | None  # LFS files: the hash the hub lists
    blob_id: str | None  # git blob sha1 (Hugging Face), for the small non-LFS files

    @property
    def etag(self) -> str:
        """The name of its blob in the Hugging Face cache."""
        return self.sha256 or self.blob_id or ""


@dataclass(frozen=True)
class RepoRef:
    """What to download: a repo on a hub at a revision, and the catalog name when it has one."""

    source: str
    repo_id: str
    revision: str
    model: str

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}"


@dataclass
class RecordedFile:
    """One file of a downloaded revision: what the hub listed for it, and when vlhub last found it right."""

    size: int
    sha256: str | None
    blob_id: str | None
    verified_at: str  # an ISO time; "" never verified (or found damaged since)

    @property
    def etag(self) -> str:
        return self.sha256 or self.blob_id or ""


@dataclass
class DownloadRecord:
    """One downloaded revision: where it is and what each file must hash to."""

    source: str
    repo_id: str
    model: str
    revision: str
    commit: str
    path: str  # the snapshot directory
    endpoint: str
    files: dict[str, RecordedFile] = field(default_factory=dict)  # by path in the repo
    damaged: list[str] = field(default_factory=list)  # files the last `vlhub cache verify` found wrong
    filtered: bool = False  # only what --include/--exclude selected is here, not the whole revision

    @classmethod
    def new(cls, ref: RepoRef, commit: str, path: Path, endpoint: str, filtered: bool) -> DownloadRecord:
        return cls(ref.source, ref.repo_id, ref.model, ref.revision, commit, str(path), endpoint, filtered=filtered)

    def add(self, file: RemoteFile, verified_at: str) -> None:
        self.files[file.path] = RecordedFile(file.size, file.sha256, file.blob_id, verified_at)
        if file.path in self.damaged:
            self.damaged.remove(file.path)

    def verified(self, file: RemoteFile) -> bool:
        """Whether vlhub already hashed this very file (same listed hash and size) and found it right."""
        entry = self.files.get(file.path)
        return bool(entry and entry.verified_at and file.path not in self.damaged
                    and (entry.size, entry.sha256, entry.blob_id) == (file.size, file.sha256, file.blob_id))

    def remote_files(self) -> list[RemoteFile]:
        return [RemoteFile(path, e.size, e.sha256, e.blob_id) for path, e in sorted(self.files.items())]

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.files.values())


def record_path(source: str, repo_id: str, commit: str) -> Path:
    return vlhub_home() / "downloads" / source / repo_id.replace("/", "--") / f"{commit}.json"


def load_record(source: str, repo_id: str, commit: str) -> DownloadRecord | None:
    path = record_path(source, repo_id, commit)
    return _read(path) if path.is_file() else None


def save_record(record: DownloadRecord) -> None:
    """Write the record in one rename (a commit point), removing first what killed runs left in its folder."""
    path = record_path(record.source, record.repo_id, record.commit)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep(path.parent)
    write_json_atomic(path, asdict(record))


def all_records() -> Iterator[DownloadRecord]:
    """Every download record, in a stable order."""
    for path in sorted((vlhub_home() / "downloads").glob("*/*/*.json")):
        record = _read(path)
        if record is not None:
            yield record


def remove_record(record: DownloadRecord) -> None:
    path = record_path(record.source, record.repo_id, record.commit)
    path.unlink(missing_ok=True)
    remove_empty_parents(path, 2)


def _read(path: Path) -> DownloadRecord | None:
    try:
        fields = json.loads(path.read_text())
        fields["files"] = {name: RecordedFile(**entry) for name, entry in fields["files"].items()}
        return DownloadRecord(**fields)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):  # a record from another version or half-edited: ignore it
        return None


def note_verified(directory: Path, manifest: Manifest, damaged: list[str]) -> None:
    """Record that every file `manifest` lists in `directory` was hashed, and what was `damaged`, when the directory
    is an artifact in the cache (by `vlhub cache verify`, or by `vlhub check`, so `vlhub cache ls` shows what either
    found). The manifest's time, the cache's "last used", is kept: checking is not using. Elsewhere (a copy on a
    device, a read-only cache) nothing is written."""
    if (vlhub_home() / "artifacts").resolve() not in directory.resolve().parents:
        return
    path = directory / MANIFEST
    with suppress(OSError):
        last_used = path.stat().st_mtime
        manifest.cache_verify = {"at": now_iso(), "ok": not damaged, "damaged": damaged}
        manifest.write(directory)
        os.utime(path, (last_used, last_used))
