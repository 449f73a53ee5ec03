"""The vlhub manifest, `vlhub-manifest.json`, that every conversion and deployment layout writes beside its files:
what it was made from, what it is, every file's sha256 and size, and its smoke verdict.

    manifest = Manifest.read(directory)          # None when there is none, or none vlhub can read
    manifest.target.name, manifest.files["config.json"].sha256, manifest.smoke
    manifest.write(directory)

One typed object, read and written here only. The JSON keeps the field names every earlier version wrote, and
fields this version does not know are kept as they were read, so old manifests read and rewrite unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from vlhub import __version__
from vlhub.errors import CorruptCheckpoint
from vlhub.formats.paths import contained
from vlhub.formats.writers import file_entry, write_json_atomic
from vlhub.units import now_iso

MANIFEST = "vlhub-manifest.json"


@dataclass(frozen=True)
class FileEntry:
    """One file the manifest lists, by its path relative to the manifest's directory."""

    sha256: str
    size: int

    @classmethod
    def of(cls, path: Path) -> FileEntry:
        """The entry of the file at `path` as it is now."""
        return cls(**file_entry(path))


@dataclass(frozen=True)
class SourceRecord:
    """What the output was converted from."""

    path: str | None = None
    model: str | None = None  # the catalog name
    repo: str | None = None
    revision: str | None = None
    format: str | None = None
    layout: str | None = None  # its key layout


@dataclass
class TargetRecord:
    """What was written. A converted checkpoint: its format, key layout and dtype. A deployment layout: its target
    `name` and `family`, its weight folder (`weights`) and the directory its smoke test runs (`smoke_path`), both
    relative to the layout, and the numbers the target built it with (`details`, under the target's own names)."""

    name: str | None = None
    family: str | None = None
    format: str | None = None
    layout: str | None = None
    dtype: str | None = None
    weights: str | None = None
    smoke_path: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Manifest:
    """A manifest; `read` and `write` move it between this object and its JSON."""

    source: SourceRecord
    target: TargetRecord
    files: dict[str, FileEntry]
    vlhub_version: str = __version__
    created: str = field(default_factory=now_iso)
    keymap: dict[str, str] | None = None  # a conversion's key map: id and digest
    ops: dict[str, int] | None = None
    tensors: int | None = None
    total_bytes: int | None = None
    graphs: dict[str, Any] | None = None  # a Paddle Inference layout's static graphs
    smoke: dict[str, Any] | None = None  # the smoke verdict: a report's, or one of the states below
    cache_verify: dict[str, Any] | None = None  # the last `vlhub cache verify` of it
    extra: dict[str, Any] = field(default_factory=dict)  # fields this version does not know

    def weights_dir(self, root: Path) -> Path:
        """The weight folder of the layout or checkpoint at `root`."""
        return listed_path(root, self.target.weights) if self.target.weights else root

    def to_json(self) -> dict[str, Any]:
        source = {f.name: getattr(self.source, f.name) for f in fields(self.source)}  # nulls too, as ever written
        target = {f.name: getattr(self.target, f.name) for f in fields(self.target) if f.name != "details"}
        top = {"vlhub_version": self.vlhub_version, "created": self.created, "source": source,
               "keymap": self.keymap,
               "target": {**{k: v for k, v in target.items() if v is not None}, **self.target.details},
               "ops": self.ops, "tensors": self.tensors, "total_bytes": self.total_bytes, "graphs": self.graphs,
               "files": {name: {"sha256": entry.sha256, "size": entry.size} for name, entry in self.files.items()},
               "smoke": self.smoke, "cache_verify": self.cache_verify}
        return {**{key: value for key, value in top.items() if value is not None}, **self.extra}

    @classmethod
    def from_json(cls, data: object) -> Manifest:
        """The manifest a parsed JSON document holds; ValueError when it is not one."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")  # noqa: TRY004 - a document of the wrong shape, as any other
        data = dict(data)
        known = {f.name for f in fields(cls)} - {"source", "target", "files", "extra"}
        try:
            files = {str(name): FileEntry(str(entry["sha256"]), int(entry["size"]))
                     for name, entry in _table(data.pop("files", {})).items()}
            source = SourceRecord(**_table(data.pop("source", {})))
            target = _table(data.pop("target", {}))
            named = {f.name for f in fields(TargetRecord)} - {"details"}
            record = TargetRecord(**{k: v for k, v in target.items() if k in named},
                                  details={k: v for k, v in target.items() if k not in named})
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed: {exc}") from None
        return cls(source, record, files, **{k: data.pop(k) for k in known if k in data}, extra=data)

    @classmethod
    def read(cls, directory: Path) -> Manifest | None:
        """The manifest in `directory`, or None when it has none or one vlhub cannot read."""
        try:
            return cls.load(directory)
        except (OSError, CorruptCheckpoint):
            return None

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        """The manifest in `directory`: OSError when there is none, CorruptCheckpoint when it is not a manifest."""
        path = Path(directory) / MANIFEST
        try:
            return cls.from_json(json.loads(path.read_text()))
        except ValueError as exc:  # json.JSONDecodeError is one
            raise CorruptCheckpoint(f"{path} is not a vlhub manifest ({exc})") from None

    def write(self, directory: Path) -> Path:
        """Write it into `directory`, atomically."""
        return write_json_atomic(Path(directory) / MANIFEST, self.to_json())


def listed_path(root: Path, name: str) -> Path:
    """`root / name` for a path the manifest in `root` names (a file it lists, the weight or smoke folder, a file of
    the target's details): a one-line CorruptCheckpoint when it leads outside `root` (see `contained`)."""
    return contained(root, name, what="output folder", named_in=root / MANIFEST)


def _table(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"{type(value).__name__} where an object belongs")
    return value


# -- the smoke record (`Manifest.smoke`): a `vlhub.smoke.verdict.SmokeReport`'s, or one of these

# What a manifest's `smoke` record says when no report was made (`passed` is then None):
SKIPPED = "skipped"  # converted with --no-smoke
NOT_RUN = "not-run"  # the runtime is not installed here
RUNNING = "running"  # recorded when the smoke test starts: still there, the run was killed before it finished
INTERRUPTED = "interrupted"  # Ctrl-C or SIGTERM during the smoke test
ERRORED = "errored"  # the smoke test stopped on an error; `reason` says which
_UNFINISHED_SUMMARY = {
    SKIPPED: "not run: converted with --no-smoke",
    NOT_RUN: "not run",
    RUNNING: "started and never finished (the run was killed)",
    INTERRUPTED: "interrupted before it finished",
    ERRORED: "stopped on an error",
}


def unfinished_verdict(state: str, reason: str = "") -> dict:
    """The manifest record of a smoke test that gave no report: its state and why."""
    assert state in _UNFINISHED_SUMMARY
    return {"passed": None, "state": state, **({"reason": reason} if reason else {})}


def verdict_state(verdict: dict | None) -> str | None:
    """passed, failed, or one of the unfinished states above; None when no verdict is recorded."""
    if verdict is None:
        return None
    if verdict.get("passed") is not None:
        return "passed" if verdict["passed"] else "failed"
    # records written before `state` existed say only why the test did not run
    return verdict.get("state", NOT_RUN)


def unfinished_summary(verdict: dict) -> str:
    """One line for a verdict without a report: what happened, and why when known."""
    state = verdict_state(verdict) or NOT_RUN
    reason = verdict.get("reason") or verdict.get("not_run")
    return _UNFINISHED_SUMMARY.get(state, state) + (f": {reason}" if reason else "")
