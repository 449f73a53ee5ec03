"""The cache under kills and concurrent runs: `vlhub download` killed at each kind of commit point and at a random
moment mid-transfer, then run again; two downloads, two `cache rm` and a `cache rm` during a download started
together; what killed runs left found by `cache verify`, removed by `cache rm --stale` and by the next download.

After each: the snapshot is complete and verified, and no temporary, partial or stale lock byte is left anywhere
under the cache (the Hugging Face cache, $VLHUB_HOME, the ModelScope cache)."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_hub import FakeHub
from tests.helpers import one_line_error, run_vlhub, run_vlhub_subprocess
from vlhub.units import format_size

REPO = "Qwen/Qwen2-VL-2B-Instruct"  # served with tiny-qwen2-vl's files, so `qwen2-vl-2b` names it
SHARD = "model-00002-of-00004.safetensors"
# a temporary named after its owner, a lock file beside a written path, a partial download
LEFTOVER = re.compile(r"\..+\.vlhub-\d+\.[a-z]+|\..+\.vlhub\.lock|.+\.incomplete")


@pytest.fixture(scope="module")
def hub(tiny_qwen2_vl: Path) -> Iterator[FakeHub]:
    with contextlib.closing(FakeHub()) as server:
        server.add_directory(REPO, tiny_qwen2_vl)
        yield server


def make_env(hub: FakeHub, root: Path) -> dict[str, str]:
    """A user's environment with its own caches under `root`, the local server as HF_ENDPOINT."""
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(root / "hf"), "VLHUB_HOME": str(root / "vlhub"),
            "MODELSCOPE_CACHE": str(root / "ms"), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}


@pytest.fixture
def env(hub: FakeHub, tmp_path: Path) -> dict[str, str]:
    hub.reset()
    return make_env(hub, tmp_path)


def hf_repo_dir(env: dict[str, str]) -> Path:
    return Path(env["HF_HOME"]) / "hub" / "models--Qwen--Qwen2-VL-2B-Instruct"


def start_download(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "vlhub", "download", "qwen2-vl-2b", *args],
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def leftover_bytes(env: dict[str, str]) -> dict[str, int]:
    """Every temporary, partial download and lock file under the caches, with its bytes (a lock file under
    $VLHUB_HOME/locks is left only by a killed holder: a finished one removes its own)."""
    found = {}
    for root in (env["HF_HOME"], env["VLHUB_HOME"], env["MODELSCOPE_CACHE"]):
        for directory, folders, files in os.walk(root):
            for name in folders + files:
                path = Path(directory, name)
                if LEFTOVER.fullmatch(name) or (path.parent.name == "locks" and name.endswith(".lock")):
                    found[str(path)] = sum(f.lstat().st_size for f in [path, *path.rglob("*")] if not f.is_dir())
    return found


def assert_complete_and_clean(env: dict[str, str], source: Path, what: str) -> None:
    """The model downloaded whole, `cache verify` passing with nothing left over, no leftover byte on disk."""
    snapshot = next((hf_repo_dir(env) / "snapshots").iterdir())
    names = sorted(p.name for p in source.iterdir() if p.is_file())
    assert sorted(p.name for p in snapshot.iterdir()) == names, what
    for name in names:
        assert (snapshot / name).read_bytes() == (source / name).read_bytes(), (what, name)
    verify = run_vlhub("cache", "verify", "--json", env=env)
    assert verify.returncode == 0, (what, verify.stdout, verify.stderr)
    assert [(r["kind"], r["verified"]) for r in json.loads(verify.stdout)] == [("download", "verified")], what
    assert leftover_bytes(env) == {}, what


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@contextlib.contextmanager
def live_process(locked: Path | None = None) -> Iterator[int]:
    """A sleeping process (holding an flock on `locked`, if given): its pid while the block runs."""
    code = ("import fcntl, sys, time\n"
            "if len(sys.argv) > 1:\n    f = open(sys.argv[1], 'ab'); fcntl.flock(f, fcntl.LOCK_EX)\n"
            "print('ready', flush=True); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code, *([str(locked)] if locked else [])],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        yield child.pid
    finally:
        child.kill()
        child.wait()


def plant(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


# --- killed downloads ------------------------------------------------------------------------------------------


def test_a_download_killed_at_each_kind_of_commit_point_ends_complete_and_clean_when_run_again(
        hub: FakeHub, tmp_path: Path, tiny_qwen2_vl: Path) -> None:
    env = make_env(hub, tmp_path / "enumerated")
    log = tmp_path / "commits.log"
    hub.reset()
    first = run_vlhub_subprocess("download", "qwen2-vl-2b", "--json", env={**env, "VLHUB_COMMIT_LOG": str(log)})
    assert first.returncode == 0, first.stderr
    labels = [line.split(" ", 1)[1] for line in log.read_text().splitlines()]
    assert {"publish a downloaded blob", "link a snapshot file", "point a ref at its commit"} <= set(labels), labels
    commit = json.loads(first.stdout)["commit"]
    assert [label for label in labels if f"{commit}.json" in label], labels  # the record
    # the first and the last point of each kind (a blob, a link, the ref, the record)
    numbered = list(enumerate(labels, 1))
    chosen = sorted({n for label in set(labels) for n in (min(n for n, at in numbered if at == label),
                                                          max(n for n, at in numbered if at == label))})
    for n in chosen:
        what = f"killed at commit point {n} ({labels[n - 1]})"
        env = make_env(hub, tmp_path / f"killed-at-{n}")
        killed = run_vlhub_subprocess("download", "qwen2-vl-2b", env={**env, "VLHUB_KILL_AT_COMMIT": str(n)})
        assert killed.returncode == -signal.SIGKILL, (what, killed.stderr)
        rerun = run_vlhub("download", "qwen2-vl-2b", env=env)
        assert rerun.returncode == 0, (what, rerun.stderr)
        assert_complete_and_clean(env, tiny_qwen2_vl, what)


def test_a_download_killed_at_a_random_moment_mid_transfer_resumes_and_leaves_nothing(
        hub: FakeHub, tmp_path: Path, tiny_qwen2_vl: Path) -> None:
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    for round_ in range(3):
        hub.reset()
        hub.throttle(20_000_000)  # per connection: ~2 s for a shard
        env = make_env(hub, tmp_path / f"round-{round_}")
        proc = start_download(env)
        deadline = time.monotonic() + 60
        while not [r for r in hub.requests if r.method == "GET" and r.path.endswith(".safetensors")]:
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        delay = rng.uniform(0, 1.5)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        what = f"seed {seed}, round {round_}: killed {delay:.2f} s into the transfer"
        hub.throttle(None)
        rerun = run_vlhub("download", "qwen2-vl-2b", env=env)
        assert rerun.returncode == 0, (what, rerun.stderr)
        assert_complete_and_clean(env, tiny_qwen2_vl, what)


# --- concurrent runs -------------------------------------------------------------------------------------------


def test_two_downloads_started_together_both_end_complete_one_having_waited_for_the_other(
        hub: FakeHub, env: dict[str, str], tiny_qwen2_vl: Path) -> None:
    hub.throttle(10_000_000)  # the first holds the lock for seconds
    procs = [start_download(env), start_download(env)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0]
    waits = [[line for line in err.splitlines() if line.startswith("waiting for")] for _, err in outputs]
    assert sorted(len(w) for w in waits) == [0, 1], waits
    waiter = 0 if waits[0] else 1
    assert f"pid {procs[1 - waiter].pid}" in waits[waiter][0]
    assert len([r for r in hub.requests if r.method == "GET" and r.path.endswith("/" + SHARD)]) == 1
    assert_complete_and_clean(env, tiny_qwen2_vl, "two downloads together")


def read_until(fd: int, text: str, timeout: float = 60) -> str:
    """What a child wrote on `fd` up to and including `text` (a prompt: no newline after it)."""
    seen, deadline = b"", time.monotonic() + timeout
    while text.encode() not in seen:
        assert time.monotonic() < deadline, seen
        if select.select([fd], [], [], 0.1)[0]:
            chunk = os.read(fd, 4096)
            assert chunk, seen
            seen += chunk
    return seen.decode()


def test_two_cache_rm_of_one_model_at_once_remove_it_once_and_the_other_fails_at_once_naming_it(
        env: dict[str, str]) -> None:
    assert run_vlhub("download", "qwen2-vl-2b", env=env).returncode == 0
    terminal, answer_side = pty.openpty()  # the first is asked on a terminal: it holds the entries while it asks
    asking = subprocess.Popen([sys.executable, "-m", "vlhub", "cache", "rm", "qwen2-vl-2b"], stdin=answer_side,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **env})
    os.close(answer_side)
    try:
        assert asking.stderr is not None
        read_until(asking.stderr.fileno(), "delete 1 entry (")
        started = time.monotonic()
        second = run_vlhub_subprocess("cache", "rm", "qwen2-vl-2b", "--yes", env=env)
        assert time.monotonic() - started < 30
        assert f"pid {asking.pid}" in one_line_error(second)
        os.write(terminal, b"y\n")
        out, err = asking.communicate(timeout=60)
    finally:
        os.close(terminal)
        if asking.poll() is None:
            asking.kill()
    assert asking.returncode == 0 and b"removed 1 entry (" in out, err
    assert json.loads(run_vlhub("cache", "ls", "--json", env=env).stdout) == []
    again = run_vlhub("cache", "rm", "qwen2-vl-2b", "--yes", env=env)
    assert "nothing of qwen2-vl-2b is in the cache" in one_line_error(again)
    assert leftover_bytes(env) == {}


def test_cache_rm_during_a_download_of_the_model_fails_at_once_naming_it(hub: FakeHub, env: dict[str, str],
                                                                        tiny_qwen2_vl: Path) -> None:
    assert run_vlhub("download", "qwen2-vl-2b", "--include", "*.json", env=env).returncode == 0  # listed in the cache
    hub.throttle(5_000_000)
    proc = start_download(env)
    try:
        deadline = time.monotonic() + 60
        while not [r for r in hub.requests if r.method == "GET" and r.path.endswith(".safetensors")]:
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        started = time.monotonic()
        refused = run_vlhub("cache", "rm", "qwen2-vl-2b", "--yes", env=env)
        assert time.monotonic() - started < 10
        line = one_line_error(refused)
        assert f"pid {proc.pid}" in line and "download" in line, line
    finally:
        hub.throttle(None)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert_complete_and_clean(env, tiny_qwen2_vl, "cache rm during a download")


# --- what killed runs left -------------------------------------------------------------------------------------


def test_cache_verify_lists_what_killed_runs_left_and_rm_stale_removes_it_keeping_what_is_in_use(
        env: dict[str, str], tiny_qwen2_vl: Path) -> None:
    snapshot = Path(run_vlhub("download", "qwen2-vl-2b", env=env).stdout.strip())
    commit, dead = snapshot.name, dead_pid()
    blobs, vlhub_home = hf_repo_dir(env) / "blobs", Path(env["VLHUB_HOME"])
    record_temporary = plant(vlhub_home / "downloads" / "huggingface" / "Qwen--Qwen2-VL-2B-Instruct" /
                             f".{commit}.json.vlhub-{dead}.tmp", 300)
    stale = {  # path -> bytes
        plant(snapshot / f".config.json.vlhub-{dead}.tmp", 100): 100,
        plant(vlhub_home / "artifacts" / "qwen2-vl-2b" / commit / f".paddle.vlhub-{dead}.tmp" / "model.pdparams",
              1000).parent: 1000,  # a conversion's staging folder
        plant(Path(env["MODELSCOPE_CACHE"]) / "models" / "Qwen--Qwen2-VL-2B-Instruct" / "snapshots" / "master" /
              f".config.json.vlhub-{dead}.tmp", 50): 50,
    }
    partial = plant(blobs / f"{'a' * 64}.incomplete", 2000)  # a download killed mid-file: resumable
    not_vlhub = plant(blobs / "notes.tmp", 10)  # the Hugging Face cache's other files are not vlhub's to judge
    written = plant(blobs / f"{'b' * 64}.incomplete", 20)
    with live_process(locked=written) as live:  # a download writing that partial now
        in_use = plant(snapshot / f".generation_config.json.vlhub-{live}.tmp", 100)

        listed = run_vlhub("cache", "verify", env=env)
        assert listed.returncode == 0, listed.stderr  # leftovers are not damage
        assert not record_temporary.exists()  # swept as verify wrote the record beside it
        for path, size in stale.items():
            line = next(line for line in listed.stdout.splitlines() if str(path) in line)
            assert f": {format_size(size)}, " in line and f"pid {dead}" in line, line
        partial_line = next(line for line in listed.stdout.splitlines() if str(partial) in line)
        assert "resumable" in partial_line and "`vlhub download qwen2-vl-2b`" in partial_line, partial_line
        assert "`vlhub cache rm --stale`" in listed.stdout
        for kept in (in_use, written, not_vlhub):
            assert str(kept) not in listed.stdout
        as_json = [r for r in json.loads(run_vlhub("cache", "verify", "--json", env=env).stdout)
                   if r["kind"] != "download"]
        assert {(r["path"], r["size_bytes"], r["owner_pid"]) for r in as_json} == {
            *((str(p), size, dead) for p, size in stale.items()), (str(partial), 2000, None)}

        refused = run_vlhub("cache", "rm", "--stale", env=env)  # no terminal to ask on
        assert refused.returncode == 2 and "pass --yes" in refused.stderr
        removed = run_vlhub("cache", "rm", "--stale", "--yes", "--json", env=env)
        assert removed.returncode == 0, removed.stderr
        report = json.loads(removed.stdout)
        assert {r["path"] for r in report["removed"]} == {*map(str, stale), str(partial)}
        assert report["freed_bytes"] == sum(stale.values()) + 2000 and report["kept"] == []
        assert not any(p.exists() for p in (*stale, partial))
        assert in_use.exists() and written.exists() and not_vlhub.exists()
    # once their owner is gone, what it held is left over too
    after = run_vlhub("cache", "rm", "--stale", "--yes", "--json", "qwen2-vl-2b", env=env)
    assert {r["path"] for r in json.loads(after.stdout)["removed"]} == {str(in_use), str(written)}, after.stderr
    assert "no leftovers" in run_vlhub("cache", "rm", "--stale", "--yes", env=env).stdout
    assert not_vlhub.exists() and leftover_bytes(env) == {}
    assert_complete_and_clean(env, tiny_qwen2_vl, "after rm --stale")


def test_a_download_removes_what_killed_runs_left_in_the_folders_it_writes(env: dict[str, str]) -> None:
    snapshot = Path(run_vlhub("download", "qwen2-vl-2b", env=env).stdout.strip())
    dead, repo = dead_pid(), hf_repo_dir(env)
    records = Path(env["VLHUB_HOME"]) / "downloads" / "huggingface" / "Qwen--Qwen2-VL-2B-Instruct"
    stale = [plant(snapshot / f".config.json.vlhub-{dead}.tmp", 10),
             plant(repo / "refs" / f".main.vlhub-{dead}.tmp", 40),
             plant(records / f".{snapshot.name}.json.vlhub-{dead}.tmp", 30)]
    with live_process() as live:
        in_use = plant(snapshot / f".config.json.vlhub-{live}.tmp", 10)
        again = run_vlhub("download", "qwen2-vl-2b", env=env)
        assert again.returncode == 0, again.stderr
        assert [p for p in stale if p.exists()] == [] and in_use.exists()
        in_use.unlink()
    assert leftover_bytes(env) == {}


def test_a_built_in_model_killed_as_it_is_published_is_made_again_with_nothing_left(tmp_path: Path) -> None:
    env = {"VLHUB_HOME": str(tmp_path / "vlhub")}
    log = tmp_path / "commits.log"
    made = run_vlhub_subprocess("cache", "path", "tiny-qwen-vl", env={**env, "VLHUB_COMMIT_LOG": str(log)})
    assert made.returncode == 0, made.stderr
    labels = [line.split(" ", 1)[1] for line in log.read_text().splitlines()]
    assert "publish a built-in model" in labels, labels
    tiny = Path(made.stdout.strip())
    shutil.rmtree(tiny)
    n = labels.index("publish a built-in model") + 1
    killed = run_vlhub_subprocess("cache", "path", "tiny-qwen-vl", env={**env, "VLHUB_KILL_AT_COMMIT": str(n)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [p.name for p in tiny.parent.iterdir() if LEFTOVER.fullmatch(p.name)]  # its staging folder stayed
    again = run_vlhub("cache", "path", "tiny-qwen-vl", env=env)
    assert again.returncode == 0 and Path(again.stdout.strip()) == tiny, again.stderr
    assert sorted(p.name for p in tiny.parent.iterdir()) == ["tiny-qwen-vl"]
