"""Containment by real path (issue 19): every file a checkpoint's index or a layout's manifest names must lead inside
that checkpoint or layout once symbolic links are followed, or the command refuses in one line and touches nothing
outside. A Hugging Face cache snapshot, whose files are links into its repo's blobs/, still reads."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import one_line_error, run_vlhub
from vlhub.formats.writers import file_entry
from vlhub.manifest import MANIFEST

INDEX = "model.safetensors.index.json"
SHARD = "model-00003-of-00004.safetensors"  # the smallest of tiny-qwen2-vl's shards


def _copy(tiny: Path, directory: Path) -> Path:
    """A copy of the session's tiny checkpoint that a test may break (the original is shared)."""
    return Path(shutil.copytree(tiny, directory))


def _name_shard(checkpoint: Path, old: str, new: str) -> None:
    """Point the index's entries for shard `old` at `new`."""
    index = json.loads((checkpoint / INDEX).read_text())
    index["weight_map"] = {key: new if shard == old else shard for key, shard in index["weight_map"].items()}
    (checkpoint / INDEX).write_text(json.dumps(index))


def _through_linked_folder(checkpoint: Path, outside: Path) -> str:
    """The index names `sub/SHARD`, `sub` a link to the folder outside that holds the shard."""
    (checkpoint / SHARD).rename(outside / SHARD)
    (checkpoint / "sub").symlink_to(outside, target_is_directory=True)
    _name_shard(checkpoint, SHARD, f"sub/{SHARD}")
    return f"sub/{SHARD}"


def _linked_shard(checkpoint: Path, outside: Path) -> str:
    """The index names SHARD as ever, and SHARD is a link to the file outside."""
    (checkpoint / SHARD).rename(outside / SHARD)
    (checkpoint / SHARD).symlink_to(outside / SHARD)
    return SHARD


COMMANDS: dict[str, Callable[[Path, Path], list[str]]] = {
    "inspect": lambda checkpoint, scratch: ["inspect", str(checkpoint)],
    "keys --in-place": lambda checkpoint, scratch: [
        "keys", str(checkpoint), "--rename", "visual.=model.visual.", "--rename", "model.=model.language_model.",
        "--in-place"],
    "convert --to paddle": lambda checkpoint, scratch: [
        "convert", str(checkpoint), "--to", "paddle", "--out", str(scratch / "out"), "--no-smoke"],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("escape", [_through_linked_folder, _linked_shard], ids=["linked folder", "linked shard"])
def test_a_shard_outside_the_checkpoint_is_refused(tiny_qwen2_vl: Path, tmp_path: Path, command: str,
                                                   escape: Callable[[Path, Path], str]) -> None:
    """The index names a shard whose real path is outside the checkpoint: refused before anything is read or written,
    in one line naming the shard and where it leads; the outside file is byte-identical and alone in its folder."""
    checkpoint, outside = _copy(tiny_qwen2_vl, tmp_path / "checkpoint"), tmp_path / "outside"
    outside.mkdir()
    named = escape(checkpoint, outside)
    before = (outside / SHARD).read_bytes()

    line = one_line_error(run_vlhub(*COMMANDS[command](checkpoint, tmp_path)))

    assert f"names {named!r}, which leads outside the checkpoint {checkpoint} (to {outside / SHARD})" in line
    assert (outside / SHARD).read_bytes() == before
    assert os.listdir(outside) == [SHARD]  # no temporary either


def _hub_snapshot(tiny: Path, hub: Path, repo: str = "models--vlhub--tiny") -> Path:
    """tiny as huggingface_hub caches it: each file a blob named by its sha256 in <repo>/blobs/, and in
    <repo>/snapshots/<commit>/ a relative link to it."""
    snapshot = hub / repo / "snapshots" / ("c0ffee" * 7)[:40]
    snapshot.mkdir(parents=True)
    (hub / repo / "blobs").mkdir()
    for file in sorted(tiny.iterdir()):
        blob = hub / repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    return snapshot


def test_a_hugging_face_cache_snapshot_reads(tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    snapshot = _hub_snapshot(tiny_qwen2_vl, tmp_path / "hub")
    result = run_vlhub("inspect", str(snapshot), "--json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["shards"]) == 4


def _blob_through_linked_folder(snapshot: Path, outside: Path) -> str:
    """`sub` a link to a folder outside holding a link to the shard's own blob: the blob is the repo's, the way to
    it is not the snapshot's."""
    (outside / SHARD).symlink_to((snapshot / SHARD).resolve())
    (snapshot / "sub").symlink_to(outside, target_is_directory=True)
    _name_shard(snapshot, SHARD, f"sub/{SHARD}")
    return f"sub/{SHARD}"


def _blob_of_another_repo(snapshot: Path, outside: Path) -> str:
    """SHARD a link to the same bytes as a blob of another repo of the cache."""
    other = snapshot.parents[2] / "models--other--repo" / "blobs"
    other.mkdir(parents=True)
    blob = (snapshot / SHARD).resolve()
    shutil.copyfile(blob, other / blob.name)
    (snapshot / SHARD).unlink()
    (snapshot / SHARD).symlink_to(Path("../../../models--other--repo/blobs") / blob.name)
    return SHARD


@pytest.mark.parametrize("escape", [_blob_through_linked_folder, _blob_of_another_repo],
                         ids=["linked folder", "another repo's blob"])
def test_a_hugging_face_snapshot_reads_only_its_own_blobs(tiny_qwen2_vl: Path, tmp_path: Path,
                                                          escape: Callable[[Path, Path], str]) -> None:
    snapshot, outside = _hub_snapshot(tiny_qwen2_vl, tmp_path / "hub"), tmp_path / "outside"
    outside.mkdir()
    named = escape(snapshot, outside)
    line = one_line_error(run_vlhub("inspect", str(snapshot)))
    assert f"names {named!r}, which leads outside the checkpoint {snapshot}" in line


# --- layouts ---------------------------------------------------------------------------------------------------------


def _edit_manifest(layout: Path, edit: Callable[[dict], None]) -> None:
    manifest = json.loads((layout / MANIFEST).read_text())
    edit(manifest)
    (layout / MANIFEST).write_text(json.dumps(manifest))


def _lists_a_parent_file(layout: Path, outside: Path) -> str:
    """The manifest lists `../outside/secret.bin`, with the sha256 and size it has."""
    (outside / "secret.bin").write_bytes(b"not the layout's")
    _edit_manifest(layout, lambda m: m["files"].update({"../outside/secret.bin": file_entry(outside / "secret.bin")}))
    return "../outside/secret.bin"


def _listed_file_is_a_link(layout: Path, outside: Path) -> str:
    """embed_tokens.json, which the manifest lists, is a link to the same bytes outside."""
    (layout / "embed_tokens.json").rename(outside / "embed_tokens.json")
    (layout / "embed_tokens.json").symlink_to(outside / "embed_tokens.json")
    return "embed_tokens.json"


def _weight_folder_is_a_link(layout: Path, outside: Path) -> str:
    """weights/, which holds the manifest's weight folder, is a link to the folder outside it was moved to."""
    (layout / "weights").rename(outside / "weights")
    (layout / "weights").symlink_to(outside / "weights", target_is_directory=True)
    return "weights/tiny-qwen2-vl"


def _yaml_outside(layout: Path, outside: Path) -> str:
    """The target's details name the language model's yaml by a path outside (a copy of it)."""
    shutil.copyfile(layout / "build_in" / "build" / "qwen2_vl_llm.yaml", outside / "llm.yaml")
    _edit_manifest(layout, lambda m: m["target"]["llm"].update(yaml="../outside/llm.yaml"))
    return "../outside/llm.yaml"


@pytest.mark.parametrize("escape", [_lists_a_parent_file, _listed_file_is_a_link, _weight_folder_is_a_link,
                                    _yaml_outside], ids=["../ file", "linked file", "linked weight folder", "yaml"])
def test_vlhub_check_refuses_a_layout_naming_files_outside_it(tmp_path: Path,
                                                              escape: Callable[[Path, Path], str]) -> None:
    """A vamc layout (the layout whose manifest names the most: files, a weight folder, yamls) whose manifest
    names a path leading outside it."""
    layout, outside = tmp_path / "layout", tmp_path / "outside"
    converted = run_vlhub("convert", "tiny-qwen2-vl", "--to", "vamc", "--out", str(layout), "--no-smoke")
    assert converted.returncode == 0, converted.stderr
    outside.mkdir()
    named = escape(layout, outside)

    line = one_line_error(run_vlhub("check", str(layout)), after_progress=True)

    assert f"{layout / MANIFEST} names {named!r}, which leads outside the output folder {layout}" in line
