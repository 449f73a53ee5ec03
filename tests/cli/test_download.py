"""`vlhub download` and `vlhub cache` through the real huggingface_hub client against a real local HTTP server
(tests/fake_hub.py) that serves the tiny models as the official repos, with faults injected (the locks, the hashing
writer and the listing's names on their own: tests/unit/test_hub.py)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pty
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_hub import FakeHub
from tests.fake_modelscope import FakeModelScope
from tests.helpers import one_line_error, run_vlhub
from vlhub.hub.tiny import GENERATOR_VERSION
from vlhub.hub.transfer import BUFFER_BYTES
from vlhub.units import format_size

REPO = "Qwen/Qwen2-VL-2B-Instruct"  # served with tiny-qwen2-vl's files, so `qwen2-vl-2b` names it
SHARD = "model-00002-of-00004.safetensors"  # 38.9 MB: the client writes in 1 MiB buffers


def hf_repo_dir(env: dict[str, str]) -> Path:
    return Path(env["HF_HOME"]) / "hub" / "models--Qwen--Qwen2-VL-2B-Instruct"


def file_gets(hub: FakeHub, name: str) -> list:
    return [r for r in hub.requests if r.method == "GET" and r.path.endswith("/" + name)]


def assert_same_files(snapshot: Path, source: Path) -> None:
    names = sorted(p.name for p in source.iterdir() if p.is_file())
    assert sorted(p.name for p in snapshot.iterdir()) == names
    for name in names:
        assert (snapshot / name).read_bytes() == (source / name).read_bytes(), name


def download(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_vlhub("download", "qwen2-vl-2b", *args, env=env)


def test_download_lands_in_the_hf_cache_and_the_client_reads_it(hub: FakeHub, env: dict[str, str],
                                                                 tiny_qwen2_vl: Path) -> None:
    result = download(env, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    snapshot = Path(report["path"])
    assert snapshot.parent.parent == hf_repo_dir(env) and report["commit"] == snapshot.name
    assert report["repo"] == REPO and report["model"] == "qwen2-vl-2b" and report["verified"] is True
    assert report["downloaded_bytes"] == report["total_bytes"] > 0
    assert_same_files(snapshot, tiny_qwen2_vl)
    # the blobs are named by their hashes, as huggingface_hub names them
    assert (snapshot / SHARD).resolve().parent == hf_repo_dir(env) / "blobs"

    # the client itself finds the snapshot, offline
    code = (f"from huggingface_hub import snapshot_download; print(snapshot_download({REPO!r}, "
            "local_files_only=True))")
    found = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                           env={**os.environ, **env, "HF_HUB_OFFLINE": "1"})
    assert found.stdout.strip() == str(snapshot), found.stderr

    # again: nothing is fetched, nothing is re-hashed; offline it answers from the record
    hub.reset()
    again = download(env, "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["downloaded_bytes"] == 0
    assert not [r for r in hub.requests if "/resolve/" in r.path]
    offline = download({**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0 and offline.stdout.strip() == str(snapshot)


def test_include_and_exclude_select_files(env: dict[str, str]) -> None:
    result = download(env, "--include", "*.json", "--exclude", "generation_config.json", "--json")
    assert result.returncode == 0, result.stderr
    snapshot = Path(json.loads(result.stdout)["path"])
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "model.safetensors.index.json"]


def test_a_dropped_connection_resumes_within_the_run(hub: FakeHub, env: dict[str, str], tiny_qwen2_vl: Path) -> None:
    hub.drop_connection(REPO, SHARD, after_bytes=25_000_000)
    result = download(env)
    assert result.returncode == 0, result.stderr
    assert f"retrying in 1 s (attempt 2/5): downloading {SHARD}" in result.stderr
    ranges = [r.range for r in file_gets(hub, SHARD)]
    assert ranges == [None, "bytes=25000000-"]  # every byte received is kept
    assert_same_files(Path(result.stdout.strip()), tiny_qwen2_vl)


def shard_partial(env: dict[str, str], source: Path) -> Path:
    """Where the client keeps the partial SHARD: blobs/<its sha256>.incomplete."""
    return hf_repo_dir(env) / "blobs" / (hashlib.sha256((source / SHARD).read_bytes()).hexdigest() + ".incomplete")


def test_an_interrupted_download_resumes_in_the_next_run(hub: FakeHub, env: dict[str, str],
                                                         tiny_qwen2_vl: Path) -> None:
    size = (tiny_qwen2_vl / SHARD).stat().st_size
    sent = hub.stall(REPO, SHARD, after_bytes=25_000_000)
    first = subprocess.Popen([sys.executable, "-m", "vlhub", "download", "qwen2-vl-2b"], env={**os.environ, **env},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    partial = shard_partial(env, tiny_qwen2_vl)
    try:
        assert sent.wait(60)
        for _ in range(100):  # the client writes what it received before we pull the plug
            if partial.is_file() and partial.stat().st_size >= 20 << 20:
                break
            time.sleep(0.1)
        first.send_signal(signal.SIGKILL)  # a crash: no cleanup runs, the lock dies with the process
    finally:
        first.wait(30)
    kept = partial.stat().st_size
    assert 0 < kept < size

    second = download(env)
    assert second.returncode == 0, second.stderr
    assert "waiting" not in second.stderr  # the dead process's lock is not waited on
    assert file_gets(hub, SHARD)[-1].range == f"bytes={kept}-"
    assert_same_files(Path(second.stdout.strip()), tiny_qwen2_vl)
    assert not list((hf_repo_dir(env) / "blobs").glob("*.incomplete"))


def test_corrupted_bytes_are_detected_and_not_kept(hub: FakeHub, env: dict[str, str], tiny_qwen2_vl: Path) -> None:
    hub.corrupt(REPO, SHARD, offset=1000)  # same size: the client's own size check passes
    result = download(env)
    assert result.returncode == 1
    assert SHARD in result.stderr and "sha256" in result.stderr and "Traceback" not in result.stderr
    assert len(file_gets(hub, SHARD)) == 2  # fetched once more from zero before giving up
    partial = shard_partial(env, tiny_qwen2_vl)
    assert not partial.exists() and not partial.with_suffix("").exists()  # neither the partial nor the blob
    assert not list(hf_repo_dir(env).glob(f"snapshots/*/{SHARD}"))
    assert not (hf_repo_dir(env) / "refs" / "main").exists()  # the revision is not complete


def test_server_errors_are_retried_with_a_countdown(hub: FakeHub, env: dict[str, str], tiny_qwen2_vl: Path) -> None:
    hub.fail(REPO, SHARD, status=503, times=2)
    result = download(env)
    assert result.returncode == 0, result.stderr
    assert [r.status for r in file_gets(hub, SHARD)] == [503, 503, 200]
    countdown = [line for line in result.stderr.splitlines() if line.startswith("retrying")]
    assert [line.split(":")[0] for line in countdown] == ["retrying in 1 s (attempt 2/5)",
                                                         "retrying in 2 s (attempt 3/5)"], result.stderr
    assert all("503" in line and SHARD in line for line in countdown)
    assert_same_files(Path(result.stdout.strip()), tiny_qwen2_vl)


@pytest.mark.parametrize("name", ["../evil.txt", "sub/../../evil.txt", "/tmp/evil.txt"])
def test_a_file_name_that_escapes_the_model_folder_is_refused(hub: FakeHub, env: dict[str, str],
                                                              tmp_path: Path, name: str) -> None:
    evil_repo = f"evil/repo{abs(hash(name))}"
    hub.add_repo(evil_repo, {"config.json": b"{}"})
    hub.add_listed_file(evil_repo, name, b"pwned")
    result = run_vlhub("download", evil_repo, env=env)
    assert result.returncode == 2 and repr(name) in result.stderr and "outside" in result.stderr
    assert not [r for r in hub.requests if "/resolve/" in r.path]  # refused before any file is fetched
    assert not list(tmp_path.rglob("evil.txt")) and not Path("/tmp/evil.txt").exists()


def test_too_little_disk_is_refused_before_downloading(hub: FakeHub, env: dict[str, str],
                                                       tiny_qwen2_vl: Path) -> None:
    result = download({**env, "VLHUB_MIN_FREE": "1000TB"})
    total = format_size(sum(p.stat().st_size for p in tiny_qwen2_vl.iterdir()))
    assert result.returncode == 2
    assert "not enough disk space" in result.stderr and f"({total};" in result.stderr, result.stderr
    assert not [r for r in hub.requests if "/resolve/" in r.path]


def test_concurrent_downloads_wait_for_each_other(hub: FakeHub, env: dict[str, str], tiny_qwen2_vl: Path) -> None:
    hub.throttle(10_000_000)  # per connection: ~4 s for the largest shard, long enough to meet the second
    procs = []
    for _ in range(2):
        procs.append(subprocess.Popen([sys.executable, "-m", "vlhub", "download", "qwen2-vl-2b"],
                                      env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
        time.sleep(1.5)
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0]
    assert "waiting for another download" in outputs[1][1]
    for name in ("config.json", SHARD):
        assert len(file_gets(hub, name)) == 1  # each file crossed the wire once
    assert_same_files(Path(outputs[0][0].strip()), tiny_qwen2_vl)
    assert run_vlhub("cache", "verify", env=env).returncode == 0


def test_unknown_repo_and_revision_are_clear_errors(env: dict[str, str]) -> None:
    missing = run_vlhub("download", "nobody/nothing", env=env)
    assert missing.returncode == 2 and "has no repo nobody/nothing" in missing.stderr
    revision = download(env, "--revision", "v9")
    assert revision.returncode == 2 and "no revision 'v9'" in revision.stderr
    built_in = run_vlhub("download", "tiny-qwen2-vl", env=env)
    assert built_in.returncode == 2 and "built in" in built_in.stderr


def flip_byte(path: Path, offset: int = 100) -> None:
    path = path.resolve()
    os.chmod(path, 0o644)
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_cache_verify_catches_a_flipped_byte_in_a_blob(env: dict[str, str]) -> None:
    snapshot = Path(download(env).stdout.strip())
    assert run_vlhub("cache", "verify", env=env).returncode == 0
    flip_byte(snapshot / SHARD)
    result = run_vlhub("cache", "verify", "qwen2-vl-2b", env=env)
    assert result.returncode == 1 and SHARD in result.stdout and "sha256 differs" in result.stdout
    listed = json.loads(run_vlhub("cache", "ls", "--json", env=env).stdout)
    assert [e["verified"] for e in listed if e["kind"] == "download"] == ["damaged (1 file)"]


def test_convert_of_a_catalog_name_downloads_first_and_lands_in_the_cache(hub: FakeHub, env: dict[str, str]) -> None:
    converted = run_vlhub("convert", "qwen2-vl-2b", "--to", "paddle", "--no-smoke", env=env)
    assert converted.returncode == 0, converted.stderr
    assert "not in the cache: downloading" in converted.stderr
    out = Path(converted.stdout.split()[0])
    commit = (hf_repo_dir(env) / "refs" / "main").read_text()
    assert out == Path(env["VLHUB_HOME"]) / "artifacts" / "qwen2-vl-2b" / commit / "paddle"
    assert run_vlhub("cache", "path", "qwen2-vl-2b", "--target", "paddle", env=env).stdout.strip() == str(out)
    assert run_vlhub("cache", "path", "qwen2-vl-2b", env=env).stdout.strip() == str(hf_repo_dir(env) / "snapshots" /
                                                                                  commit)

    # the same command again is answered from the cache
    hub.reset()
    again = run_vlhub("convert", "qwen2-vl-2b", "--to", "paddle", "--no-smoke", env=env)
    assert again.returncode == 0 and "cached" in again.stdout and not hub.requests

    listed = {e["kind"]: e for e in json.loads(run_vlhub("cache", "ls", "--json", env=env).stdout)}
    assert listed["paddle"]["path"] == str(out) and listed["download"]["verified"] == "verified"

    shard = next(out.glob("*.pdparams"))
    flip_byte(shard)
    result = run_vlhub("cache", "verify", env=env)
    assert result.returncode == 1 and shard.name in result.stdout


def test_cache_rm_asks_then_removes_only_what_was_named(env: dict[str, str]) -> None:
    assert run_vlhub("convert", "qwen2-vl-2b", "--to", "paddle", "--no-smoke", env=env).returncode == 0
    refused = run_vlhub("cache", "rm", "qwen2-vl-2b", env=env)  # no terminal to ask on
    assert refused.returncode == 2 and "--yes" in refused.stderr

    removed = run_vlhub("cache", "rm", "qwen2-vl-2b", "--target", "paddle", "--yes", env=env)
    assert removed.returncode == 0, removed.stderr
    kinds = [e["kind"] for e in json.loads(run_vlhub("cache", "ls", "qwen2-vl-2b", "--json", env=env).stdout)]
    assert kinds == ["download"]
    assert not (Path(env["VLHUB_HOME"]) / "artifacts" / "qwen2-vl-2b").exists()

    assert run_vlhub("cache", "rm", "qwen2-vl-2b", "--yes", env=env).returncode == 0
    assert run_vlhub("cache", "ls", "qwen2-vl-2b", "--json", env=env).returncode == 2  # nothing of it is there
    assert not hf_repo_dir(env).exists()
    gone = run_vlhub("cache", "path", "qwen2-vl-2b", env=env)
    assert gone.returncode == 2 and "no download of qwen2-vl-2b" in gone.stderr


@pytest.fixture(scope="module")
def modelscope(tiny_qwen2_vl: Path) -> Iterator[FakeModelScope]:
    pytest.importorskip("modelscope_hub", reason="the modelscope extra is not installed")
    with contextlib.closing(FakeModelScope()) as server:
        server.add_directory(REPO, tiny_qwen2_vl)
        yield server


@pytest.fixture
def ms_env(modelscope: FakeModelScope, tmp_path: Path) -> dict[str, str]:
    return {"MODELSCOPE_ENDPOINT": modelscope.url, "MODELSCOPE_CACHE": str(tmp_path / "ms"),
            "MODELSCOPE_HOME": str(tmp_path / "ms-home"), "MODELSCOPE_DOWNLOAD_INTRA_CLOUD": "false",
            "VLHUB_HOME": str(tmp_path / "vlhub")}


def test_modelscope_download_is_listed_checked_and_verifiable(ms_env: dict[str, str], tiny_qwen2_vl: Path) -> None:
    result = run_vlhub("download", "qwen2-vl-2b", "--source", "modelscope", "--json", env=ms_env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    snapshot = Path(report["path"])
    assert snapshot.is_relative_to(Path(ms_env["MODELSCOPE_CACHE"])) and report["source"] == "modelscope"
    assert_same_files(snapshot, tiny_qwen2_vl)
    listed = json.loads(run_vlhub("cache", "ls", "--json", env=ms_env).stdout)
    assert [(e["source"], e["verified"]) for e in listed] == [("modelscope", "verified")]
    flip_byte(snapshot / SHARD)
    verify = run_vlhub("cache", "verify", env=ms_env)
    assert verify.returncode == 1 and SHARD in verify.stdout


def test_modelscope_with_hf_hub_offline_opens_no_connection(modelscope: FakeModelScope, ms_env: dict[str, str],
                                                           tiny_qwen2_vl: Path) -> None:
    # HF_HUB_OFFLINE is vlhub's offline switch for every hub (docs/download-and-cache.md#offline): --source
    # modelscope connected anyway, and without a network failed after the probe as if the hub were down
    offline = {**ms_env, "HF_HUB_OFFLINE": "1"}
    modelscope.requests.clear()
    line = one_line_error(run_vlhub("download", "qwen2-vl-2b", "--source", "modelscope", env=offline))
    assert "HF_HUB_OFFLINE" in line and "not in the cache" in line and "--source modelscope" in line, line
    assert modelscope.requests == []
    online = run_vlhub("download", "qwen2-vl-2b", "--source", "modelscope", "-q", env=ms_env)
    assert online.returncode == 0, online.stderr
    modelscope.requests.clear()
    again = run_vlhub("download", "qwen2-vl-2b", "--source", "modelscope", "-q", env=offline)
    assert (again.returncode, again.stdout) == (0, online.stdout), again.stderr
    assert modelscope.requests == []
    shard = Path(online.stdout.strip()) / SHARD
    damaged = bytearray(shard.read_bytes())
    damaged[-1] ^= 0xFF  # the same size: only its hash tells
    shard.write_bytes(bytes(damaged))
    assert run_vlhub("cache", "verify", env=offline).returncode == 1  # found: no longer recorded as checked
    line = one_line_error(run_vlhub("download", "qwen2-vl-2b", "--source", "modelscope", env=offline), code=1,
                          after_progress=True)
    assert SHARD in line and "HF_HUB_OFFLINE" in line, line
    assert modelscope.requests == []  # not fetched afresh behind the user's back
    shard.unlink()
    line = one_line_error(run_vlhub("download", "qwen2-vl-2b", "--source", "modelscope", env=offline))
    assert SHARD in line and "1 file" in line, line
    assert modelscope.requests == []


def test_modelscope_corrupted_bytes_and_unsafe_names_are_refused(modelscope: FakeModelScope,
                                                                  ms_env: dict[str, str]) -> None:
    modelscope.add_repo("org/corrupt", {"config.json": b"{}", "model.safetensors": os.urandom(100_000)})
    modelscope.corrupt("org/corrupt", "model.safetensors")
    corrupt = run_vlhub("download", "org/corrupt", "--source", "modelscope", env=ms_env)
    assert corrupt.returncode == 1 and "model.safetensors" in corrupt.stderr and "sha256" in corrupt.stderr
    assert not list(Path(ms_env["MODELSCOPE_CACHE"]).rglob("model.safetensors*"))

    modelscope.add_repo("org/evil", {"config.json": b"{}", "../../escape.txt": b"pwned"})
    evil = run_vlhub("download", "org/evil", "--source", "modelscope", env=ms_env)
    assert evil.returncode == 2 and "outside the model's folder" in evil.stderr
    assert not list(Path(ms_env["MODELSCOPE_CACHE"]).parent.rglob("escape.txt"))


def test_a_catalog_model_another_client_downloaded_is_listed_verified_and_removed(env: dict[str, str]) -> None:
    code = f"from huggingface_hub import snapshot_download; print(snapshot_download({REPO!r}))"
    fetched = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                             env={**os.environ, **env})
    snapshot = Path(fetched.stdout.strip().splitlines()[-1])
    listed = json.loads(run_vlhub("cache", "ls", "--json", env=env).stdout)
    assert [(e["kind"], e["path"], e["verified"]) for e in listed] == [("download", str(snapshot), "unverified")]
    assert run_vlhub("cache", "verify", env=env).returncode == 0  # by the hashes its blobs are named after
    flip_byte(snapshot / SHARD)
    damaged = run_vlhub("cache", "verify", env=env)
    assert damaged.returncode == 1 and SHARD in damaged.stdout
    assert run_vlhub("cache", "rm", "qwen2-vl-2b", "--yes", env=env).returncode == 0
    assert not hf_repo_dir(env).exists()


def test_cached_conversions_are_keyed_by_options_and_smoke_tested_when_reused(tmp_path: Path) -> None:
    pytest.importorskip("paddle")
    env = {"VLHUB_HOME": str(tmp_path / "vlhub")}
    first = run_vlhub("convert", "tiny-qwen2-vl", "--to", "paddle", "--no-smoke", env=env)
    assert first.returncode == 0, first.stderr
    out = Path(first.stdout.split()[0])
    assert out == tmp_path / "vlhub" / "artifacts" / "tiny-qwen2-vl" / f"builtin-v{GENERATOR_VERSION}" / "paddle"
    cast = run_vlhub("convert", "tiny-qwen2-vl", "--to", "paddle", "--dtype", "float16", "--no-smoke", env=env)
    assert Path(cast.stdout.split()[0]) == out.with_name("paddle+dtype=float16")

    reused = run_vlhub("convert", "tiny-qwen2-vl", "--to", "paddle", "--json", env=env)  # the smoke was skipped
    assert reused.returncode == 0, reused.stderr
    report = json.loads(reused.stdout)
    assert report["cached"] and report["out"] == str(out) and report["smoke"]["passed"] is True
    assert json.loads((out / "vlhub-manifest.json").read_text())["smoke"]["passed"] is True
    smokes = {e["kind"]: e["smoke"] for e in json.loads(run_vlhub("cache", "ls", "--json", env=env).stdout)}
    assert smokes == {"built-in": None, "paddle": "passed", "paddle+dtype=float16": "skipped"}


def test_two_revisions_of_one_repo_downloading_at_once_share_blobs_safely(hub: FakeHub, env: dict[str, str],
                                                                          tiny_qwen2_vl: Path) -> None:
    commit = json.loads(download(env, "--include", "config.json", "--json").stdout)["commit"]
    hub.reset()
    hub.throttle(40_000_000)
    procs = [subprocess.Popen([sys.executable, "-m", "vlhub", "download", "qwen2-vl-2b", *revision],
                              env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for revision in ([], ["--revision", commit])]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0]
    assert len([r for r in file_gets(hub, SHARD) if r.status in (200, 206)]) == 1  # one fetched, one waited
    assert_same_files(Path(outputs[0][0].strip()), tiny_qwen2_vl)


def test_bad_options_and_bad_input_fail_before_any_download(hub: FakeHub, env: dict[str, str]) -> None:
    for args in (["convert", "qwen2-vl-2b", "--to", "bogus"], ["convert", "qwen2-vl-2b", "--to", "paddle",
                                                              "--dtype", "float7"],
                 ["download", "org/na me"], ["download", "qwen2-vl-2b", "--endpoint", "127.0.0.1:1"]):
        started = time.monotonic()
        result = run_vlhub(*args, env=env)
        assert result.returncode == 2 and result.stderr.startswith("error: "), (args, result.stderr)
        assert "Traceback" not in result.stderr and time.monotonic() - started < 10
    assert not hub.requests


def test_a_refused_file_is_a_one_line_error(hub: FakeHub, env: dict[str, str]) -> None:
    hub.fail(REPO, SHARD, status=403, times=1)
    result = download(env, "--json")
    assert result.returncode == 2 and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "403" in errors[0] and SHARD in errors[0] and "Traceback" not in result.stderr, result.stderr


def test_a_subset_download_is_not_taken_for_the_model(hub: FakeHub, env: dict[str, str]) -> None:
    subset = download(env, "--include", "*.json", "--json")
    assert json.loads(subset.stdout)["files"] == 3
    listed = json.loads(run_vlhub("cache", "ls", "--json", env=env).stdout)
    assert listed[0]["verified"] == "verified (--include/--exclude subset)"
    offline = download({**env, "HF_HUB_OFFLINE": "1"})  # the whole model is asked for: not here
    assert offline.returncode == 2 and "only some files" in offline.stderr
    converted = run_vlhub("convert", "qwen2-vl-2b", "--to", "paddle", "--no-smoke", "--json", env=env)
    assert converted.returncode == 0, converted.stderr  # the rest was fetched first
    assert len(file_gets(hub, "config.json")) == 1  # what was there was not fetched again
    assert json.loads(run_vlhub("cache", "ls", "qwen2-vl-2b", "--json", env=env).stdout)[0]["verified"] == "verified"


def test_a_snapshot_path_is_converted_into_the_cache_not_into_the_hub_cache(env: dict[str, str]) -> None:
    snapshot = Path(download(env).stdout.strip())
    converted = run_vlhub("convert", str(snapshot), "--to", "paddle", "--no-smoke", env=env)
    assert converted.returncode == 0, converted.stderr
    out = Path(converted.stdout.split()[0])
    assert out == Path(env["VLHUB_HOME"]) / "artifacts" / "qwen2-vl-2b" / snapshot.name / "paddle"
    assert [p.name for p in snapshot.parent.iterdir()] == [snapshot.name]


def test_a_damaged_cached_conversion_is_reported_and_made_again(env: dict[str, str]) -> None:
    first = run_vlhub("convert", "qwen2-vl-2b", "--to", "paddle", "--no-smoke", env=env)
    out = Path(first.stdout.split()[0])
    (out / "vlhub-manifest.json").write_text('{"files": {')
    verify = run_vlhub("cache", "verify", "qwen2-vl-2b", env=env)
    assert verify.returncode == 1 and "vlhub-manifest.json: unreadable" in verify.stdout
    again = run_vlhub("convert", "qwen2-vl-2b", "--to", "paddle", "--no-smoke", "--json", env=env)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["cached"] is False and json.loads((out / "vlhub-manifest.json").read_text())


def test_ctrl_c_stops_a_download_at_once_and_keeps_what_arrived(hub: FakeHub, env: dict[str, str],
                                                                tiny_qwen2_vl: Path) -> None:
    sent = hub.stall(REPO, SHARD, after_bytes=25_000_000)
    proc = subprocess.Popen([sys.executable, "-m", "vlhub", "download", "qwen2-vl-2b"], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert sent.wait(60)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "interrupted" in stderr and time.monotonic() - started < 5
    kept = 25_000_000 // BUFFER_BYTES * BUFFER_BYTES  # the whole buffers that arrived (the last one was filling)
    assert shard_partial(env, tiny_qwen2_vl).stat().st_size == kept
    resumed = download(env)
    assert resumed.returncode == 0 and file_gets(hub, SHARD)[-1].range == f"bytes={kept}-"
    assert_same_files(Path(resumed.stdout.strip()), tiny_qwen2_vl)


# --- `hf download`'s arguments and options, with the same meanings --------------------------------------------------


def test_filenames_select_files_and_one_file_prints_its_own_path_as_hf_does(hub: FakeHub, env: dict[str, str],
                                                                           tiny_qwen2_vl: Path) -> None:
    one = run_vlhub("download", REPO, "config.json", env=env)
    assert one.returncode == 0, one.stderr
    path = Path(one.stdout.strip())
    assert path.name == "config.json" and path.read_bytes() == (tiny_qwen2_vl / "config.json").read_bytes()
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]
    # what `hf download REPO config.json` prints in its quiet mode: the same path
    hf = subprocess.run(["hf", "download", REPO, "config.json", "--quiet"], capture_output=True, text=True,
                        env={**os.environ, **env}, check=True)
    assert hf.stdout.strip() == str(path)

    two = run_vlhub("download", REPO, "config.json", "generation_config.json", "--include", "*.safetensors", env=env)
    assert two.returncode == 0 and "ignoring --include" in two.stderr
    snapshot = Path(two.stdout.strip())
    assert snapshot == path.parent
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "generation_config.json"]
    missing = run_vlhub("download", REPO, "nope.json", env=env)
    assert missing.returncode == 2 and "no file 'nope.json'" in missing.stderr


def test_quiet_prints_only_the_path(env: dict[str, str]) -> None:
    result = download(env, "-q")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert Path(result.stdout.strip()).is_dir() and len(result.stdout.splitlines()) == 1


def test_without_a_terminal_a_download_says_when_it_starts_and_ends(env: dict[str, str]) -> None:
    result = download(env)
    lines = result.stderr.splitlines()
    assert lines[0] == f"downloading {REPO}@main (7 files): 81 MB", result.stderr
    assert lines[1].startswith(f"downloading {REPO}@main (7 files): done, 81 MB in "), result.stderr
    assert lines[-1].startswith(f"{REPO}@main: 7 files, 81 MB, each checked") and "downloaded now" in lines[-1]
    assert "━" not in result.stderr  # no bar drawn into a log


def test_dry_run_lists_what_would_be_downloaded_with_sizes_and_writes_nothing(hub: FakeHub, env: dict[str, str],
                                                                             tiny_qwen2_vl: Path) -> None:
    result = download(env, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "would download 7 files of 7, 81 MB" in result.stdout
    assert "model-00002-of-00004.safetensors" in result.stdout and "38.9 MB" in result.stdout
    assert not Path(env["HF_HOME"]).exists() and not Path(env["VLHUB_HOME"]).exists()
    assert not [r for r in hub.requests if "/resolve/" in r.path]

    assert download(env, "--include", "*.json", "-q").returncode == 0
    listed = json.loads(download(env, "--dry-run", "--json").stdout)
    sizes = {p.name: p.stat().st_size for p in tiny_qwen2_vl.iterdir()}
    assert {f["file"]: f["size_bytes"] for f in listed["files"]} == sizes
    assert {f["file"] for f in listed["files"] if not f["will_download"]} == {n for n in sizes if n.endswith(".json")}
    assert listed["total_bytes"] == sum(size for name, size in sizes.items() if not name.endswith(".json"))


def test_local_dir_is_laid_out_as_hf_lays_it_out_and_convert_takes_it(hub: FakeHub, env: dict[str, str],
                                                                      tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    local = tmp_path / "qwen2-vl-2b"
    result = download(env, "--local-dir", str(local))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(local)
    for name in (p.name for p in tiny_qwen2_vl.iterdir()):  # and .cache/huggingface/, as hf writes it
        assert (local / name).read_bytes() == (tiny_qwen2_vl / name).read_bytes()
    assert not (Path(env["HF_HOME"]) / "hub").exists()  # plain files, not the cache
    # huggingface_hub itself takes every file as downloaded: `hf download --local-dir` fetches nothing again
    hub.reset()
    subprocess.run(["hf", "download", REPO, "--local-dir", str(local), "--quiet"], capture_output=True, text=True,
                   env={**os.environ, **env}, check=True)
    assert not [r for r in hub.requests if r.method == "GET" and "/resolve/" in r.path]
    again = download(env, "--local-dir", str(local), "--json")
    assert json.loads(again.stdout)["downloaded_bytes"] == 0

    converted = run_vlhub("convert", str(local), "--to", "paddle", "--no-smoke", "--json", env=env)
    assert converted.returncode == 0, converted.stderr
    assert json.loads(converted.stdout)["out"] == str(tmp_path / "qwen2-vl-2b-paddle")
    both = download(env, "--local-dir", str(local), "--cache-dir", str(tmp_path / "c"))
    assert both.returncode == 2 and "pass one of them" in both.stderr


def test_local_dir_gets_equal_files_at_each_of_their_paths(hub: FakeHub, env: dict[str, str], tmp_path: Path) -> None:
    hub.add_repo("org/twins", {"config.json": b"{}", "a/w.safetensors": b"x" * 1000, "b/w.safetensors": b"x" * 1000})
    result = run_vlhub("download", "org/twins", "--local-dir", str(tmp_path / "twins"), "-q", env=env)
    assert result.returncode == 0, result.stderr
    assert [(tmp_path / "twins" / side / "w.safetensors").read_bytes() for side in "ab"] == [b"x" * 1000] * 2


def test_cache_dir_is_the_hub_cache_to_use(env: dict[str, str], tmp_path: Path) -> None:
    cache = tmp_path / "elsewhere"
    result = download(env, "--cache-dir", str(cache))
    assert result.returncode == 0, result.stderr
    snapshot = Path(result.stdout.strip())
    assert snapshot.is_relative_to(cache / "models--Qwen--Qwen2-VL-2B-Instruct" / "snapshots")
    code = (f"from huggingface_hub import snapshot_download; print(snapshot_download({REPO!r}, cache_dir={str(cache)!r}, "
            "local_files_only=True))")
    found = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                           env={**os.environ, **env})
    assert found.stdout.strip() == str(snapshot)
    listed = json.loads(run_vlhub("cache", "ls", "--json", env=env).stdout)
    assert [(e["id"], e["path"], e["verified"]) for e in listed] == [(f"model/{REPO}", str(snapshot), "verified")]


def test_a_gated_repo_needs_a_token_from_the_option_or_hf_token(hub: FakeHub, env: dict[str, str],
                                                                tiny_qwen2_vl: Path) -> None:
    gated = "org/gated-model"
    hub.add_directory(gated, tiny_qwen2_vl)
    hub.gate(gated, "hf_secret")
    refused = run_vlhub("download", gated, env=env)
    line = one_line_error(refused)
    assert "gated/needs a token: pass --token or set HF_TOKEN" in line, line
    wrong = one_line_error(run_vlhub("download", gated, "--token", "hf_wrong", env=env))
    assert "no access" in wrong
    assert not [r for r in hub.requests if "/resolve/" in r.path]

    with_option = run_vlhub("download", gated, "--token", "hf_secret", "-q", env=env)
    assert with_option.returncode == 0, with_option.stderr
    assert_same_files(Path(with_option.stdout.strip()), tiny_qwen2_vl)
    with_env = run_vlhub("download", gated, "--force-download", "-q", env={**env, "HF_TOKEN": "hf_secret"})
    assert with_env.returncode == 0, with_env.stderr


def test_force_download_fetches_every_file_again(hub: FakeHub, env: dict[str, str], tiny_qwen2_vl: Path) -> None:
    assert download(env, "-q").returncode == 0
    hub.reset()
    assert json.loads(download(env, "--json").stdout)["downloaded_bytes"] == 0
    forced = json.loads(download(env, "--force-download", "--json").stdout)
    assert forced["downloaded_bytes"] == forced["total_bytes"]
    assert len([r for r in hub.requests if r.method == "GET" and "/resolve/" in r.path]) == 7
    assert_same_files(Path(forced["path"]), tiny_qwen2_vl)


def test_max_workers_and_repo_type_mean_what_they_mean_in_hf(hub: FakeHub, env: dict[str, str]) -> None:
    assert download(env, "--max-workers", "1", "-q").returncode == 0
    assert "--max-workers 0: give 1 or more" in one_line_error(download(env, "--max-workers", "0"))
    assert download(env, "--repo-type", "model", "-q").returncode == 0
    line = one_line_error(download(env, "--repo-type", "dataset"))
    assert "models only" in line
    assert "choose one of model, dataset" in one_line_error(download(env, "--repo-type", "datasets"))


def test_hf_uris_name_the_repo_revision_and_file_as_in_hf(hub: FakeHub, env: dict[str, str]) -> None:
    commit = json.loads(download(env, "--include", "*.json", "--json").stdout)["commit"]
    one = run_vlhub("download", f"hf://models/{REPO}@{commit}/config.json", "-q", env=env)
    assert one.returncode == 0, one.stderr
    assert Path(one.stdout.strip()) == hf_repo_dir(env) / "snapshots" / commit / "config.json"
    assert "models only" in one_line_error(run_vlhub("download", "hf://datasets/org/data", env=env))
    assert "drop --repo-type and --revision" in one_line_error(
        run_vlhub("download", f"hf://{REPO}", "--revision", "main", env=env))


def on_a_terminal(env: dict[str, str], *args: str) -> tuple[int, str]:
    """`vlhub ARGS` with stderr on a terminal (a pty): its exit code and what the terminal showed."""
    terminal, child_side = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "vlhub", *args], stdout=subprocess.PIPE, stderr=child_side,
                            env={**os.environ, **env, "COLUMNS": "120"})
    os.close(child_side)
    shown = b""
    while True:
        try:
            chunk = os.read(terminal, 4096)
        except OSError:  # the child closed its side
            break
        if not chunk:
            break
        shown += chunk
    os.close(terminal)
    return proc.wait(timeout=60), shown.decode(errors="replace")


def test_on_a_terminal_the_bar_shows_once_the_inputs_are_checked_and_never_before_a_refusal(
        hub: FakeHub, env: dict[str, str]) -> None:
    code, shown = on_a_terminal(env, "download", "qwen2-vl-2b")
    assert code == 0 and "downloading Qwen/Qwen2-VL-2B-Instruct" in shown and "━" in shown, shown
    assert "done, 81 MB" not in shown  # the lines for logs are not printed beside the bar
    for refused in (["download", "qwen2-vl-2b", "--revision", "v9", "--force-download"],
                    ["download", "org/nothing-here"], ["download", "qwen2-vl-2b", "--max-workers", "0"]):
        code, shown = on_a_terminal(env, *refused)
        assert code == 2 and "━" not in shown and "error:" in shown, (refused, shown)


def test_relative_cache_and_local_dirs_print_absolute_paths_and_the_cache_finds_them_from_elsewhere(
        hub: FakeHub, env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # hf download resolves --cache-dir and --local-dir (and prints /abs/...); a relative path kept in the record made
    # `cache ls` say "incomplete (N missing)" and `cache verify` fail every file, run from any other directory
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    cached = download(env, "--cache-dir", "c", "-q")
    local = download(env, "--local-dir", "ld", "config.json", "-q")
    assert cached.returncode == local.returncode == 0, cached.stderr + local.stderr
    snapshot = tmp_path / "work" / "c" / "models--Qwen--Qwen2-VL-2B-Instruct" / "snapshots"
    assert Path(cached.stdout.strip()).parent == snapshot
    assert local.stdout.strip() == str(tmp_path / "work" / "ld" / "config.json")
    monkeypatch.chdir(tmp_path)
    listed = json.loads(run_vlhub("cache", "ls", "--json", env=env).stdout)
    assert [(e["path"], e["verified"]) for e in listed] == [(cached.stdout.strip(), "verified")]
    verified = run_vlhub("cache", "verify", env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_folder_with_include_or_exclude_is_refused_as_hf_refuses_it(hub: FakeHub, env: dict[str, str]) -> None:
    # hf download refuses `art/ --include ...` (it only ignores --include beside file names); vlhub ignored it
    for option in ("--include", "--exclude"):
        line = one_line_error(download(env, "art/", option, "*.json"))
        assert "art/" in line and '--include "art/*"' in line, line
    assert not hub.requests


def test_files_another_client_left_are_hashed_with_progress_not_in_silence(hub: FakeHub, env: dict[str, str]) -> None:
    # a snapshot hf download made: vlhub hashes every file before it takes it (minutes for a 7B model), and said
    # nothing until the summary
    subprocess.run(["hf", "download", REPO, "--quiet"], capture_output=True, env={**os.environ, **env}, check=True)
    hub.reset()
    result = download(env)
    assert result.returncode == 0, result.stderr
    assert not file_gets(hub, SHARD)  # nothing fetched again
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"checking {REPO}@main (7 files already there): "), result.stderr
    assert lines[1].startswith(f"checking {REPO}@main (7 files already there): done, "), result.stderr
