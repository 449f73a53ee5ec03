"""Network failures as a user without a network, or behind a dead mirror, meets them: a hub that cannot be reached
(the name does not resolve, the port is closed, TLS fails) fails within seconds, exit 3, in one line with the ways
around it; 5xx and dropped connections are retried with a countdown on stderr, then exit 3; with HF_HUB_OFFLINE=1
a cached model converts without opening a connection, and one that is not cached fails naming what is missing."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_hub import FakeHub
from tests.helpers import one_line_error, run_vlhub, run_vlhub_subprocess

REPO = "Qwen/Qwen2-VL-2B-Instruct"  # served with tiny-qwen2-vl's files, so `qwen2-vl-2b` names it
SHARD = "model-00002-of-00004.safetensors"
REMEDIES = ("HF_ENDPOINT", "--source modelscope", "local checkpoint directory", "HF_HUB_OFFLINE=1")


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def unreachable_line(result: object, started: float, reason: str) -> str:
    """The run failed within 5 s with exit 3 and one line naming the reason and every remedy."""
    elapsed = time.monotonic() - started
    assert elapsed < 5, f"took {elapsed:.1f} s"
    line = one_line_error(result, 3)
    assert "unreachable" in line and reason in line, line
    assert all(remedy in line for remedy in REMEDIES), line
    # HF_ENDPOINT is already a mirror here: the line named it, and still said to set HF_ENDPOINT to a mirror
    assert "(HF_ENDPOINT) is unreachable" in line and "set HF_ENDPOINT to a mirror" not in line, line
    return line


def test_an_unresolvable_endpoint_fails_the_headline_convert_within_seconds(env: dict[str, str]) -> None:
    pytest.importorskip("paddle")  # --to paddle-inference needs Paddle before anything is fetched
    started = time.monotonic()
    result = run_vlhub("convert", "qwen2-vl-7b", "--to", "paddle-inference",
                       env={**env, "HF_ENDPOINT": "http://nonexistent.invalid"})
    # the line saying it downloads first is not an error; the error is one line
    result.stderr = "\n".join(line for line in result.stderr.splitlines() if "downloading" not in line)
    unreachable_line(result, started, "does not resolve")


@pytest.mark.parametrize("command", [["download", "qwen2-vl-2b"], ["convert", "qwen2-vl-2b", "--to", "paddle"]])
def test_a_closed_port_fails_within_seconds(env: dict[str, str], command: list[str]) -> None:
    started = time.monotonic()
    result = run_vlhub(*command, env={**env, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"})
    result.stderr = "\n".join(line for line in result.stderr.splitlines() if "downloading" not in line)
    unreachable_line(result, started, "refused")


def test_an_unreachable_endpoint_option_is_named_as_the_one_to_check(env: dict[str, str]) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    line = one_line_error(run_vlhub("download", "qwen2-vl-2b", "--endpoint", endpoint, env=env), 3)
    assert f"the configured endpoint {endpoint} (--endpoint) is unreachable" in line, line
    assert "check --endpoint" in line and "set HF_ENDPOINT to a mirror" not in line, line
    assert all(remedy in line for remedy in REMEDIES[1:]), line


def test_a_tls_failure_fails_within_seconds(hub: FakeHub, env: dict[str, str]) -> None:
    started = time.monotonic()
    result = run_vlhub("download", "qwen2-vl-2b", env={**env, "HF_ENDPOINT": hub.url.replace("http:", "https:")})
    unreachable_line(result, started, "TLS")


def test_a_dead_proxy_is_named_not_blamed_on_the_hub(hub: FakeHub, env: dict[str, str]) -> None:
    # the hub itself is up; the proxy the environment names refuses: the line said "the hub ... is unreachable (the
    # connection was refused)" and sent the user to mirrors, never to HTTP_PROXY
    proxy = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    result = run_vlhub_subprocess("download", "qwen2-vl-2b", timeout=60,
                                  env={**env, "HTTP_PROXY": proxy, "NO_PROXY": "", "no_proxy": ""})
    assert time.monotonic() - started < 5
    line = one_line_error(result, 3)
    assert f"the proxy {proxy} (HTTP_PROXY)" in line and "refused" in line and "NO_PROXY" in line, line


@pytest.fixture
def refusing_proxy() -> Iterator[str]:
    """A proxy that answers every request, CONNECT included, with 407 Proxy Authentication Required."""
    server = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = server.accept()
                with connection:
                    connection.recv(65536)
                    connection.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n"
                                       b"Connection: close\r\n\r\n")

    threading.Thread(target=answer, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


def test_a_proxy_that_refuses_to_connect_fails_within_seconds(refusing_proxy: str, env: dict[str, str]) -> None:
    # the CONNECT refused (407, 403) was retried as a dropped connection: five attempts, 16 s
    started = time.monotonic()
    result = run_vlhub_subprocess("download", "qwen2-vl-2b", timeout=60,
                                  env={**env, "HF_ENDPOINT": "https://127.0.0.1:9", "HTTPS_PROXY": refusing_proxy,
                                       "NO_PROXY": "", "no_proxy": ""})
    assert time.monotonic() - started < 5
    line = one_line_error(result, 3)
    assert f"through the proxy {refusing_proxy} (HTTPS_PROXY)" in line and "407" in line, line


def test_modelscope_unreachable_fails_within_seconds(env: dict[str, str], tmp_path: Path) -> None:
    pytest.importorskip("modelscope_hub", reason="the modelscope extra is not installed")
    started = time.monotonic()
    result = run_vlhub("download", "qwen2-vl-2b", "--source", "modelscope",
                       env={**env, "MODELSCOPE_ENDPOINT": "http://nonexistent.invalid",
                            "MODELSCOPE_CACHE": str(tmp_path / "ms")})
    assert time.monotonic() - started < 5
    line = one_line_error(result, 3)
    assert "unreachable" in line and "MODELSCOPE_ENDPOINT" in line and "--source huggingface" in line, line


def test_modelscope_behind_a_dead_proxy_fails_within_seconds(env: dict[str, str], tmp_path: Path) -> None:
    # the probe skipped the proxied connection, and the ModelScope client retried through the dead proxy for 9 s
    pytest.importorskip("modelscope_hub", reason="the modelscope extra is not installed")
    proxy = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    result = run_vlhub_subprocess("download", "qwen2-vl-2b", "--source", "modelscope", timeout=60,
                                  env={**env, "MODELSCOPE_ENDPOINT": "http://modelscope.invalid", "HTTP_PROXY": proxy,
                                       "NO_PROXY": "", "no_proxy": "", "MODELSCOPE_CACHE": str(tmp_path / "ms")})
    assert time.monotonic() - started < 5
    line = one_line_error(result, 3)
    assert f"through the proxy {proxy} (HTTP_PROXY)" in line and "refused" in line, line


def test_server_errors_are_retried_with_a_countdown_then_exit_3(hub: FakeHub, env: dict[str, str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("vlhub.hub.download.RETRY_DELAYS", (0, 0, 0, 0))  # the five attempts, without the waits
    hub.fail(REPO, SHARD, status=503, times=5)
    result = run_vlhub("download", "qwen2-vl-2b", env=env)
    assert result.returncode == 3, result.stderr
    assert [f"(attempt {n}/5)" in result.stderr for n in range(2, 6)] == [True] * 4, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "503" in errors[0] and "run the same command again to resume" in errors[0]


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_a_failing_listing_is_retried_with_a_countdown_in_a_dry_run_too(hub: FakeHub, env: dict[str, str],
                                                                        dry_run: list[str],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # --dry-run's listing was retried with no notice: up to 15 s of silence
    monkeypatch.setattr("vlhub.hub.download.RETRY_DELAYS", (0, 0, 0, 0))
    hub.fail(REPO, "", status=503, times=2)
    result = run_vlhub("download", "qwen2-vl-2b", *dry_run, "-q", env=env)
    assert result.returncode == 0, result.stderr
    assert [line.split(":")[0] for line in result.stderr.splitlines()] == [
        "retrying in 0 s (attempt 2/5)", "retrying in 0 s (attempt 3/5)"], result.stderr


@pytest.fixture
def silent_hub() -> Iterator[str]:
    """A hub that accepts connections and never answers (an overloaded mirror, a proxy that swallows requests):
    each connection is held 4 s, then closed."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def hold() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                connection, _ = server.accept()
                threading.Timer(4, connection.close).start()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    server.close()


def test_a_hub_that_never_answers_is_retried_with_a_countdown_not_waited_for_forever(
        silent_hub: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    # no timeout on the first request (huggingface_hub's API calls have none): the run waited silently for as long
    # as the server held the connection, and the retries after it did not say the server had timed out
    monkeypatch.setattr("vlhub.hub.download.RETRY_DELAYS", (0, 0, 0, 0))
    started = time.monotonic()
    result = run_vlhub("download", "qwen2-vl-2b", env={**env, "HF_ENDPOINT": silent_hub, "HF_HUB_ETAG_TIMEOUT": "1"})
    assert time.monotonic() - started < 8
    assert result.returncode == 3, result.stderr
    notices = [line for line in result.stderr.splitlines() if line.startswith("retrying in")]
    assert len(notices) == 4 and all("timed out" in line for line in notices), result.stderr


@pytest.fixture
def cached(hub: FakeHub, env: dict[str, str]) -> dict[str, str]:
    """qwen2-vl-2b downloaded, and the environment of a machine where no hub is reachable any more."""
    assert run_vlhub("download", "qwen2-vl-2b", "-q", env=env).returncode == 0
    return {**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}


def refuse_connections(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Make any connection attempt of this process fail loudly, and note it."""
    attempts: list[object] = []

    def refused(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise AssertionError(f"a connection was opened: {args}")

    monkeypatch.setattr(socket.socket, "connect", refused)
    monkeypatch.setattr(socket, "getaddrinfo", refused)
    return attempts


def test_offline_a_cached_model_downloads_converts_inspects_and_plans_without_a_connection(
        cached: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    attempts = refuse_connections(monkeypatch)
    download = run_vlhub("download", "qwen2-vl-2b", env=cached)
    assert download.returncode == 0, download.stderr
    converted = run_vlhub("convert", "qwen2-vl-2b", "--to", "paddle", "--no-smoke", env=cached)
    assert converted.returncode == 0, converted.stderr
    assert run_vlhub("inspect", "qwen2-vl-2b", env=cached).returncode == 0
    planned = run_vlhub("plan", "qwen2-vl-2b", "--image", "640x480", env=cached)
    assert planned.returncode == 0, planned.stderr
    assert not attempts


def test_offline_a_local_dir_is_answered_from_its_own_metadata_as_hf_answers_it(
        hub: FakeHub, env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `vlhub download M --local-dir D && vlhub convert D` copied to a machine without network: hf download returns
    # D there; vlhub refused --local-dir under HF_HUB_OFFLINE outright
    local = tmp_path / "qwen2-vl-2b"
    assert run_vlhub("download", "qwen2-vl-2b", "--local-dir", str(local), "-q", env=env).returncode == 0
    offline = {**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    attempts = refuse_connections(monkeypatch)
    again = run_vlhub("download", "qwen2-vl-2b", "--local-dir", str(local), "-q", env=offline)
    assert (again.returncode, again.stdout.strip()) == (0, str(local)), again.stderr
    one = run_vlhub("download", "qwen2-vl-2b", "config.json", "--local-dir", str(local), "-q", env=offline)
    assert (one.returncode, one.stdout.strip()) == (0, str(local / "config.json")), one.stderr
    other_commit = run_vlhub("download", "qwen2-vl-2b", "--local-dir", str(local), "--revision", "0" * 40, env=offline)
    assert "not in" in one_line_error(other_commit)
    (local / SHARD).write_bytes(b"edited")  # no longer the file the metadata notes (written after it)
    os.utime(local / SHARD, (time.time() + 10, time.time() + 10))
    line = one_line_error(run_vlhub("download", "qwen2-vl-2b", "--local-dir", str(local), env=offline))
    assert "HF_HUB_OFFLINE" in line and SHARD in line, line
    line = one_line_error(run_vlhub("download", "qwen2-vl-2b", "--local-dir", str(tmp_path / "empty"), env=offline))
    assert "HF_HUB_OFFLINE" in line and "not in" in line, line
    assert not attempts


def test_offline_force_download_is_refused_in_one_line(cached: dict[str, str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # it tried the hub anyway and failed with "cannot use: Cannot reach ...: offline mode is enabled"
    attempts = refuse_connections(monkeypatch)
    line = one_line_error(run_vlhub("download", "qwen2-vl-2b", "--force-download", env=cached))
    assert "HF_HUB_OFFLINE" in line and "--force-download" in line, line
    assert not attempts


def test_offline_a_model_not_in_the_cache_fails_in_one_line_with_the_remedy(
        cached: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    attempts = refuse_connections(monkeypatch)
    line = one_line_error(run_vlhub("download", "qwen2-vl-7b", env=cached))
    assert "HF_HUB_OFFLINE" in line and "not in the cache" in line and "vlhub download qwen2-vl-7b" in line, line
    snapshot = next((Path(cached["HF_HOME"]) / "hub").glob("models--Qwen--Qwen2-VL-2B-Instruct/snapshots/*"))
    (snapshot / SHARD).resolve().unlink()  # the blob: its content is gone from the cache
    line = one_line_error(run_vlhub("download", "qwen2-vl-2b", env=cached))
    assert SHARD in line and "1 file" in line and "unset HF_HUB_OFFLINE" in line, line
    assert not attempts
