"""How SRC is read (vlhub/hub/sources.py), as a user names what they have: an existing path first, even when its name
is a catalog model's (as `hf` and transformers take it); a repo id outside the catalog that was downloaded here, by
its cached snapshot; and the source a conversion records, absolute, so `vlhub smoke` finds it from any directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fake_hub import FakeHub
from tests.helpers import hard_link_or_copy, one_line_error, run_vlhub
from vlhub.manifest import Manifest

OTHER_REPO = "tiny-org/Some-Repo"  # outside the catalog, served with tiny-qwen2.5-vl's files


def copy_of(model: Path, destination: Path) -> Path:
    destination.mkdir()
    for file in model.iterdir():
        if file.is_file():
            hard_link_or_copy(file, destination / file.name)
    return destination


def converted(result: object) -> Path:
    assert result.returncode == 0, result.stderr  # type: ignore[attr-defined]
    return Path(json.loads(result.stdout)["out"])  # type: ignore[attr-defined]


def test_a_directory_named_like_a_catalog_model_is_that_directory(
        tiny_qwen2_5_vl: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `vlhub download REPO --local-dir Tiny-Qwen2-VL && vlhub convert Tiny-Qwen2-VL` converted the built-in
    # tiny-qwen2-vl's family record: the manifest named the built-in model and the output went to its cache folder
    monkeypatch.chdir(tmp_path)
    copy_of(tiny_qwen2_5_vl, tmp_path / "Tiny-Qwen2-VL")  # the name of another catalog model, case changed
    out = converted(run_vlhub("convert", "Tiny-Qwen2-VL", "--to", "safetensors", "--no-smoke", "--json"))
    assert out.resolve() == (tmp_path / "Tiny-Qwen2-VL-safetensors").resolve()  # beside it, as any directory
    source = Manifest.load(out).source
    assert source.model is None and source.repo is None
    assert source.path == str((tmp_path / "Tiny-Qwen2-VL").resolve())
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == json.loads((tiny_qwen2_5_vl / "config.json").read_text())["model_type"]
    plan = run_vlhub("plan", "Tiny-Qwen2-VL", "--image", "448x448", "--json")
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["family"] == json.loads(run_vlhub(
        "plan", str(tiny_qwen2_5_vl), "--image", "448x448", "--json").stdout)["family"]


def test_the_recorded_source_is_absolute_so_smoke_finds_it_from_anywhere(
        tiny_qwen2_vl: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the manifest kept the path as typed (relative to where convert ran): `vlhub smoke /abs/out` from elsewhere
    # said "the source ... is gone; pass --against SRC"
    (tmp_path / "work").mkdir()
    (tmp_path / "elsewhere").mkdir()
    copy_of(tiny_qwen2_vl, tmp_path / "work" / "mine")
    monkeypatch.chdir(tmp_path / "work")
    out = converted(run_vlhub("convert", "mine", "--to", "safetensors", "--no-smoke", "--json")).resolve()
    assert Manifest.load(out).source.path == str((tmp_path / "work" / "mine").resolve())
    monkeypatch.chdir(tmp_path / "elsewhere")
    smoke = run_vlhub("smoke", str(out))
    assert smoke.returncode == 0, smoke.stderr


@pytest.fixture(scope="module")
def other_repo(hub: FakeHub, tiny_qwen2_5_vl: Path) -> str:
    hub.add_directory(OTHER_REPO, tiny_qwen2_5_vl)
    return OTHER_REPO


def test_a_downloaded_repo_outside_the_catalog_is_named_by_its_repo_id(
        other_repo: str, env: dict[str, str], tiny_qwen2_5_vl: Path, tmp_path: Path) -> None:
    # `cache path` and `cache ls` knew it; inspect, plan and convert said "unknown model"
    assert run_vlhub("download", other_repo, "-q", env=env).returncode == 0
    snapshot = Path(run_vlhub("cache", "path", other_repo, env=env).stdout.strip())
    offline = {**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}  # answered from the cache alone
    for environment in (env, offline):
        inspected = run_vlhub("inspect", other_repo, "--json", env=environment)
        assert inspected.returncode == 0, inspected.stderr
        plan = run_vlhub("plan", other_repo, "--image", "448x448", "--json", env=environment)
        assert plan.returncode == 0, plan.stderr
    out = converted(run_vlhub("convert", other_repo, "--to", "safetensors", "--no-smoke", "--json", env=offline))
    assert Manifest.load(out).source.path == str(snapshot.resolve())
    assert (json.loads((out / "config.json").read_text())["model_type"]
            == json.loads((tiny_qwen2_5_vl / "config.json").read_text())["model_type"])


def test_a_repo_downloaded_at_another_revision_is_found_by_vlhubs_record(
        other_repo: str, hub: FakeHub, tiny_qwen2_5_vl: Path, env: dict[str, str]) -> None:
    # the cache has no `main` of it (what `hf` looks for): vlhub's record of the download names its snapshot
    commit = hub.add_directory(other_repo, tiny_qwen2_5_vl, branch="dev")
    assert run_vlhub("download", other_repo, "--revision", "dev", "-q", env=env).returncode == 0
    inspected = run_vlhub("inspect", other_repo, "--json", env={**env, "HF_HUB_OFFLINE": "1"})
    assert inspected.returncode == 0, inspected.stderr
    assert Path(json.loads(inspected.stdout)["path"]).name == commit


def test_a_repo_id_not_downloaded_says_to_download_it(env: dict[str, str], hub: FakeHub) -> None:
    hub.requests.clear()
    for command in (["inspect"], ["plan"], ["convert", "--to", "safetensors"]):
        args = [command[0], "tiny-org/Not-Here", *command[1:]]
        line = one_line_error(run_vlhub(*args, env=env))
        assert "`vlhub download tiny-org/Not-Here`" in line and "no such file or directory" in line, line
    assert hub.requests == []  # nothing was asked of the hub, let alone fetched
