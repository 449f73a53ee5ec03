"""`vlhub cache` as `hf cache` users know it: entries named as `hf cache ls` names them and those ids taken
everywhere a model is, a relative "last used", `cache prune` (unreferenced revisions and what killed runs left), and
the verified state `vlhub check` leaves shown by `cache ls`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fake_hub import FakeHub
from tests.helpers import one_line_error, run_vlhub
from vlhub.cli.cache import time_ago

REPO = "Qwen/Qwen2-VL-2B-Instruct"  # served with tiny-qwen2-vl's files, so `qwen2-vl-2b` names it
CACHE_ID = f"model/{REPO}"  # as `hf cache ls` prints it


def hf_cache_ids(env: dict[str, str]) -> list[str]:
    """The ids `hf cache ls` itself prints (its quiet format: one id a line)."""
    listed = subprocess.run(["hf", "cache", "ls", "--format", "json"], capture_output=True, text=True, check=True,
                            env={**os.environ, **env})
    return [entry["id"] for entry in json.loads(listed.stdout)]


def test_downloads_are_named_as_hf_cache_ls_names_them_and_the_id_is_taken_everywhere(env: dict[str, str]) -> None:
    snapshot = run_vlhub("download", "qwen2-vl-2b", "-q", env=env).stdout.strip()
    assert hf_cache_ids(env) == [CACHE_ID]
    listed = run_vlhub("cache", "ls", env=env)
    row = next(line for line in listed.stdout.splitlines() if CACHE_ID in line)
    assert "a few seconds ago" in row and "verified" in row, listed.stdout
    assert listed.stdout.rstrip().endswith("1 entry, 81 MB")

    for name in (CACHE_ID, REPO, "qwen2-vl-2b"):
        by_name = run_vlhub("cache", "ls", name, "--json", env=env)
        assert by_name.returncode == 0, by_name.stderr
        assert [(e["id"], e["path"]) for e in json.loads(by_name.stdout)] == [(CACHE_ID, snapshot)]
    assert run_vlhub("cache", "path", CACHE_ID, env=env).stdout.strip() == snapshot
    assert run_vlhub("cache", "verify", CACHE_ID, env=env).returncode == 0

    unknown = one_line_error(run_vlhub("cache", "ls", "model/Qwen/Nothing-Here", env=env))
    assert "nothing of model/Qwen/Nothing-Here is in the cache" in unknown
    assert "models only" in one_line_error(run_vlhub("cache", "ls", "dataset/org/data", env=env))
    removed = run_vlhub("cache", "rm", CACHE_ID, "--yes", env=env)
    assert removed.returncode == 0 and removed.stdout.startswith("removed 1 entry ("), removed.stdout
    assert hf_cache_ids(env) == []


@pytest.mark.parametrize(("seconds", "said"), [(5, "a few seconds ago"), (60, "1 minute ago"), (3 * 3600, "3 hours ago"),
                                               (2 * 86400, "2 days ago"), (8 * 86400, "1 week ago"),
                                               (400 * 86400, "1 year ago")])
def test_last_used_is_written_as_hf_cache_ls_writes_it(seconds: int, said: str) -> None:
    from huggingface_hub.utils._parsing import format_timesince

    now = time.time()
    assert time_ago(now - seconds, now) == said
    assert format_timesince(time.time() - seconds) == said  # huggingface_hub's own words for the same time


def test_prune_removes_unreferenced_revisions_and_what_killed_runs_left(hub: FakeHub, env: dict[str, str],
                                                                        tiny_qwen2_vl: Path) -> None:
    first = json.loads(run_vlhub("download", "qwen2-vl-2b", "--json", env=env).stdout)
    # main moves on: a commit with one file changed; the first commit is then referenced by nothing
    files = {p.name: p.read_bytes() for p in tiny_qwen2_vl.iterdir()}
    hub.add_repo(REPO, {**files, "generation_config.json": b'{"changed": true}'})
    second = json.loads(run_vlhub("download", "qwen2-vl-2b", "--json", env=env).stdout)
    assert first["commit"] != second["commit"]
    repo = Path(env["HF_HOME"]) / "hub" / "models--Qwen--Qwen2-VL-2B-Instruct"
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    stale = Path(second["path"]) / f".config.json.vlhub-{dead}.tmp"  # a killed run's temporary
    stale.write_bytes(b"x" * 100)
    partial = repo / "blobs" / f"{'a' * 64}.incomplete"  # resumable: kept
    partial.write_bytes(b"y" * 10)

    dry = run_vlhub("cache", "prune", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("would remove 1 revision and 1 leftover of killed runs ("), dry.stdout
    assert first["commit"][:12] in dry.stderr and str(stale) in dry.stderr
    assert Path(first["path"]).is_dir() and stale.exists()

    refused = run_vlhub("cache", "prune", env=env)  # no terminal to ask on
    assert refused.returncode == 2 and refused.stderr.splitlines()[-1].endswith("without confirmation: pass --yes")
    pruned = run_vlhub("cache", "prune", "--yes", "--json", env=env)
    assert pruned.returncode == 0, pruned.stderr
    report = json.loads(pruned.stdout)
    assert [r["revision"] for r in report["revisions"]] == [first["commit"]]
    assert report["freed_bytes"] == len(files["generation_config.json"]) + 100  # the one blob not shared
    assert not Path(first["path"]).exists() and not stale.exists() and partial.exists()
    assert Path(second["path"]).is_dir()
    # huggingface_hub sees one revision left, whole
    code = "from huggingface_hub import scan_cache_dir; print([len(r.revisions) for r in scan_cache_dir().repos])"
    scanned = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, **env})
    assert scanned.stdout.strip() == "[1]"
    assert run_vlhub("cache", "verify", env=env).returncode == 0
    assert "nothing to prune" in run_vlhub("cache", "prune", env=env).stdout


def test_cache_ls_shows_verified_once_check_hashed_every_file_of_a_cached_conversion(tmp_path: Path) -> None:
    env = {"VLHUB_HOME": str(tmp_path / "vlhub")}
    converted = run_vlhub("convert", "tiny-qwen2-vl", "--to", "paddle", "--no-smoke", env=env)
    assert converted.returncode == 0, converted.stderr
    out = Path(converted.stdout.split()[0])

    def state() -> tuple[str, float]:
        entry = next(e for e in json.loads(run_vlhub("cache", "ls", "--json", env=env).stdout) if e["kind"] == "paddle")
        return entry["verified"], entry["last_used"]

    before, used = state()
    assert before == "unverified"
    checked = run_vlhub("check", str(out), env=env)
    assert "sizes and sha256 as recorded" in checked.stdout, checked.stdout + checked.stderr
    assert state() == ("verified", used)  # checking is not using
    next(out.glob("*.pdparams")).write_bytes(b"not what was written")
    assert run_vlhub("check", str(out), env=env).returncode == 1
    assert state()[0] == "damaged (1 file)"


def test_prune_forgets_a_revision_another_client_removed_without_its_warnings(env: dict[str, str]) -> None:
    # `hf cache rm` left vlhub's record: prune listed it as "unreferenced" and huggingface_hub's "Revision(s) not
    # found - cannot delete them" came out once for the size and once for each removal
    assert run_vlhub("download", "qwen2-vl-2b", "-q", env=env).returncode == 0
    subprocess.run(["hf", "cache", "rm", CACHE_ID, "-y"], capture_output=True, check=True, env={**os.environ, **env})
    pruned = run_vlhub("cache", "prune", "--yes", env=env)
    assert pruned.returncode == 0, pruned.stderr
    assert "not found" not in pruned.stderr and "files are gone" in pruned.stderr, pruned.stderr
    assert pruned.stdout.strip() == "removed 1 revision (0 B)"
    assert json.loads(run_vlhub("cache", "ls", "--json", env=env).stdout) == []
