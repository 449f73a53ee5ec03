"""A disk that fills while a command writes (issue 19): one line naming the path and the bytes needed (all the
command writes, and how much more to free given what is free once its staging files are gone), exit 2, no
traceback, nothing left behind (no staging file, no lock), the source and any older output as they were.

The free-space check before writing passes; the disk fills afterwards. In this process the write that fills it is
simulated: after half the bytes the writer's writes fail with ENOSPC (the shard writer's `_HashingFile.write` for
conversions, `os.copy_file_range` for `vlhub keys`, which copies tensor bytes in the kernel, and the table file of
`dump-embeddings`). Where this machine lets the test mount a 30 MB tmpfs, the same happens on a real filesystem: the
command is stopped (SIGSTOP) once its staging folder exists (its free-space check passed), the tmpfs is filled, and
the command goes on.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

import pytest

from tests.helpers import one_line_error, run_vlhub, small_sharded_source
from vlhub import embeddings
from vlhub.formats import direct_io, writers
from vlhub.units import parse_size

FULL = OSError(errno.ENOSPC, "No space left on device")
RENAME = ["--rename", "lm_head.=head.", "--allow-unknown-layout"]


def _leftovers(root: Path) -> list[str]:
    """vlhub temporaries (`.NAME.vlhub-PID.KIND`) and lock files (`.NAME.vlhub.lock`) under `root`."""
    return [str(p.relative_to(root)) for p in sorted(root.rglob("*"))
            if ".vlhub-" in p.name or p.name.endswith(".vlhub.lock")]


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


SIZE = r"([\d.]+ [KMGT]?B)"


def _needed(line: str, path: Path, what: str) -> tuple[int, int]:
    """The bytes the one error line says `what` needs, and how many more to free, after checking it names `path`."""
    assert line.startswith(f"error: the disk filled while writing {what} to {path}: "), line
    need, more = re.search(rf"\bneed {SIZE}\b", line), re.search(rf"\bfree {SIZE} more\b", line)
    assert need and more, line
    return _bytes(need[1]), _bytes(more[1])


def _bytes(size: str) -> int:
    return 0 if size == "0 B" else parse_size(size.replace(" ", ""))


@pytest.fixture(scope="module")
def source(module_tmp: Callable[[str], Path]) -> Path:
    """tiny-qwen2-vl's architecture with a 2048-token vocabulary (4.2 MB) in 15 safetensors shards, with the
    manifest `vlhub convert` writes."""
    out = small_sharded_source(module_tmp("disk-full-raw") / "raw", module_tmp("disk-full-source") / "src")
    return out


# --- the write that fills the disk ----------------------------------------------------------------------------------


class _Disk:
    """Room for `room` more bytes: a write beyond that fails with ENOSPC (after writing what still fits)."""

    def __init__(self, room: int) -> None:
        self.room = room

    def take(self, wanted: int) -> int:
        granted = min(wanted, self.room)
        self.room -= granted
        if not granted and wanted:
            raise FULL
        return granted


def _fill_shard_writer(monkeypatch: pytest.MonkeyPatch, disk: _Disk) -> None:
    real = writers._HashingFile.write

    def write(self: Any, data: bytes | memoryview) -> int:
        granted = disk.take(len(data))
        real(self, memoryview(data)[:granted])
        if granted < len(data):
            raise FULL
        return granted

    monkeypatch.setattr(writers._HashingFile, "write", write)


def _fill_staged_writes(monkeypatch: pytest.MonkeyPatch, disk: _Disk) -> None:
    """The disk fills under the writer's own thread (`direct_io`'s staged buffers, 64 KB here so that a tiny
    model's shards fill many), not under the caller's write."""
    real = direct_io.DirectWriteFile._write_block

    def write_block(self: Any, view: memoryview) -> None:
        granted = disk.take(len(view))
        real(self, view[:granted])
        if granted < len(view):
            raise FULL

    monkeypatch.setattr(direct_io, "CHUNK", 64 << 10)
    monkeypatch.setattr(direct_io.DirectWriteFile, "_write_block", write_block)


def _fill_kernel_copies(monkeypatch: pytest.MonkeyPatch, disk: _Disk) -> None:
    real = os.copy_file_range

    def copy_file_range(source: int, target: int, count: int, offset_src: int | None = None,
                        offset_dst: int | None = None) -> int:
        return real(source, target, disk.take(count), offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", copy_file_range)


class _FillingFile:
    """A file opened for writing by vlhub.embeddings whose writes take room on `disk`."""

    def __init__(self, file: Any, disk: _Disk) -> None:
        self._file, self._disk = file, disk

    def write(self, data: bytes | memoryview) -> int:
        granted = self._disk.take(len(data))
        self._file.write(memoryview(data)[:granted])
        if granted < len(data):
            raise FULL
        return granted

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


def _fill_table_files(monkeypatch: pytest.MonkeyPatch, disk: _Disk) -> None:
    def filling_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        opened = builtins.open(file, mode, *args, **kwargs)  # noqa: SIM115 - closed by the caller's with
        return _FillingFile(opened, disk) if "w" in mode else opened

    monkeypatch.setattr(embeddings, "open", filling_open, raising=False)  # shadows the builtin in that module


# --- in this process ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("to", ["safetensors", "paddle"])
@pytest.mark.parametrize("overwrite", [False, True], ids=["new --out", "--overwrite"])
@pytest.mark.parametrize("fill", [_fill_shard_writer, _fill_staged_writes], ids=["write", "staged write"])
def test_convert(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, to: str, overwrite: bool,
                 fill: Callable[[pytest.MonkeyPatch, _Disk], None]) -> None:
    out = tmp_path / "out"
    if overwrite:  # an older output, which must stay as it was
        assert run_vlhub("convert", str(source), "--to", to, "--out", str(out), "--dtype", "float32",
                         "--no-smoke").returncode == 0
    older = _digests(out) if overwrite else None
    before, total = _digests(source), _size(source)
    fill(monkeypatch, _Disk(total // 2))

    result = run_vlhub("convert", str(source), "--to", to, "--out", str(out), "--no-smoke",
                       *(["--overwrite"] if overwrite else []))

    needed, _ = _needed(one_line_error(result, after_progress=True), out, "the converted weights")
    assert abs(needed - total) < total // 20, (needed, total)
    assert (_digests(out) if out.exists() else None) == older
    assert _digests(source) == before
    assert _leftovers(tmp_path) == [] and _leftovers(source.parent) == []
    assert sorted(os.listdir(tmp_path)) == (["out"] if overwrite else [])


@pytest.mark.parametrize("in_place", [False, True], ids=["--out", "--in-place"])
def test_keys_of_a_folder(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_place: bool) -> None:
    checkpoint = Path(shutil.copytree(source, tmp_path / "ck"))
    before, total = _digests(checkpoint), _size(checkpoint)
    out = checkpoint if in_place else tmp_path / "out"
    _fill_kernel_copies(monkeypatch, _Disk(total // 2))

    result = run_vlhub("keys", str(checkpoint), *RENAME, *(["--in-place"] if in_place else ["--out", str(out)]))

    needed, _ = _needed(one_line_error(result, after_progress=True), out, "the renamed weights")
    assert abs(needed - total) < total // 20, (needed, total)
    assert _digests(checkpoint) == before
    assert _leftovers(tmp_path) == [] and _leftovers(source.parent) == []
    assert os.listdir(tmp_path) == ["ck"]


@pytest.mark.parametrize("in_place", [False, True], ids=["--out FILE", "--in-place"])
def test_keys_of_a_single_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: Path, in_place: bool) -> None:
    """`keys` of one weight file writes that file alone (a temporary renamed over it), outside the folder path; it
    said "error: cannot use: No space left on device" before 80e1ec5."""
    single = tmp_path / "single"
    assert run_vlhub("convert", str(source), "--to", "safetensors", "--out", str(single), "--no-smoke").returncode == 0
    (single / "vlhub-manifest.json").unlink()  # a lone weight file among the user's others: only it is replaced
    weights = single / "model.safetensors"
    before, total = _digests(single), weights.stat().st_size
    out = weights if in_place else tmp_path / "renamed.safetensors"
    _fill_kernel_copies(monkeypatch, _Disk(total // 2))

    result = run_vlhub("keys", str(weights), *RENAME, *(["--in-place"] if in_place else ["--out", str(out)]))

    assert "Traceback" not in result.stderr
    assert _digests(single) == before and _leftovers(tmp_path) == [] and sorted(os.listdir(tmp_path)) == ["single"]
    needed, _ = _needed(one_line_error(result, after_progress=True), out, "the renamed weights")
    assert abs(needed - total) < total // 20, (needed, total)


@pytest.mark.parametrize("overwrite", [False, True], ids=["new files", "--overwrite"])
def test_dump_embeddings(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overwrite: bool) -> None:
    """The first table fits, the second does not: the message names the second."""
    out = tmp_path / "embed_tokens.bin"
    if overwrite:
        assert run_vlhub("dump-embeddings", str(source), "--out", str(out), "--lm-head", "--dtype",
                         "float32").returncode == 0
    older = _digests(tmp_path)
    before = _digests(source)
    table = 2048 * 128 * 2  # float16
    _fill_table_files(monkeypatch, _Disk(table + table // 2))

    result = run_vlhub("dump-embeddings", str(source), "--out", str(out), "--lm-head",
                       *(["--overwrite"] if overwrite else []))

    needed, _ = _needed(one_line_error(result, after_progress=True), tmp_path / "lm_head.bin", "the tables")
    assert abs(needed - 2 * table) < table // 20, (needed, table)
    assert _digests(tmp_path) == older
    assert _digests(source) == before
    assert _leftovers(tmp_path) == []


# --- on a real filesystem -------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 30 MB tmpfs mounted for the test (skipped where mounting is not permitted)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(mount)], capture_output=True,
                             text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> None:
    """Write a file on `disk` until it is full, to the last byte."""
    with open(disk / "filler", "wb", buffering=0) as filler:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    filler.write(bytes(size))
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc


def _fills_while_writing(args: list[str], written: Path, disk: Path) -> subprocess.CompletedProcess[str]:
    """`vlhub ARGS`, stopped once its staging folder for `written` exists, until `disk` is full."""
    process = subprocess.Popen([sys.executable, "-m", "vlhub", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    staging = written.with_name(f".{written.name}.vlhub-{process.pid}.tmp")
    try:
        deadline = time.monotonic() + 120
        while not staging.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.001)
        process.send_signal(signal.SIGSTOP)
        _fill(disk)
    finally:
        process.send_signal(signal.SIGCONT)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def test_convert_on_a_disk_that_fills(source: Path, small_disk: Path) -> None:
    before = _digests(source)
    result = _fills_while_writing(["convert", str(source), "--to", "safetensors", "--out", str(small_disk / "out"),
                                   "--no-smoke"], small_disk / "out", small_disk)
    assert "Traceback" not in result.stderr
    needed, more = _needed(one_line_error(result, after_progress=True), small_disk / "out", "the converted weights")
    assert abs(needed - _size(source)) < _size(source) // 20 and 0 < more <= needed, (needed, more)
    assert os.listdir(small_disk) == ["filler"]
    assert _digests(source) == before


def test_keys_in_place_on_a_disk_that_fills(source: Path, small_disk: Path) -> None:
    checkpoint = Path(shutil.copytree(source, small_disk / "ck"))
    before = _digests(checkpoint)
    result = _fills_while_writing(["keys", str(checkpoint), *RENAME, "--in-place"], checkpoint, small_disk)
    assert "Traceback" not in result.stderr
    needed, more = _needed(one_line_error(result, after_progress=True), checkpoint, "the renamed weights")
    assert abs(needed - _size(checkpoint)) < _size(checkpoint) // 20 and 0 < more <= needed, (needed, more)
    assert sorted(os.listdir(small_disk)) == ["ck", "filler"]
    assert _digests(checkpoint) == before
