"""`vlhub convert`: round trips, layouts, dtypes, dry runs and every way it refuses bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import run_vlhub
from vlhub.errors import UserError
from vlhub.formats.readers import open_checkpoint
from vlhub.formats.tensors import float32_from_bf16_bits
from vlhub.formats.writers import CheckpointWriter, file_sha256
from vlhub.keymaps import load_keymap
from vlhub.targets import prepare_conversion

TINY = {"tiny-qwen2-vl": ("safetensors", "tiny_qwen2_vl"), "tiny-qwen2.5-vl": ("safetensors", "tiny_qwen2_5_vl"),
        "tiny-qwen-vl": ("torch", "tiny_qwen_vl")}


def _tensors(path: Path) -> dict[str, np.ndarray]:
    with open_checkpoint(path) as checkpoint:
        return {meta.name: array for meta, array in checkpoint.iter_tensors()}


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_models_convert_to_paddle_and_back_bit_identically(
        request: pytest.FixtureRequest, tmp_path: Path, name: str) -> None:
    back_format, fixture = TINY[name]
    original = request.getfixturevalue(fixture)
    paddle_dir, back_dir = tmp_path / "paddle", tmp_path / "back"
    prepare_conversion(name, to="paddle").write(paddle_dir)
    prepare_conversion(str(paddle_dir), to=back_format).write(back_dir)
    before, after = _tensors(original), _tensors(back_dir)
    assert list(after) == list(before)
    for key, array in before.items():
        assert after[key].dtype == array.dtype and np.array_equal(after[key], array), key
    assert json.loads((back_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_paddle_output_is_what_paddle_loads(tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    paddle = pytest.importorskip("paddle")
    prepare_conversion(str(tiny_qwen2_vl), to="paddle").write(tmp_path / "p")
    state = paddle.load(str(tmp_path / "p" / "model_state.pdparams"))
    original = _tensors(tiny_qwen2_vl)
    assert set(state) == set(original)
    keymap = load_keymap("qwen2_vl")
    transposed = 0
    for key, array in original.items():
        assert str(state[key].dtype) == "paddle.bfloat16"
        bits = state[key].view(paddle.uint16).numpy()
        if keymap.rule_for(key).kind == "linear":  # Paddle's Linear stores [in, out]
            assert np.array_equal(bits, array.T), key
            transposed += 1
        else:
            assert np.array_equal(bits, array), key
    assert transposed == 25
    # a Paddle Linear holding the converted weight computes what torch's Linear computes
    x = np.random.default_rng(0).standard_normal((3, 128)).astype(np.float32)
    w = float32_from_bf16_bits(original["model.layers.0.mlp.up_proj.weight"])
    layer = paddle.nn.Linear(128, 256, bias_attr=False)
    layer.weight.set_value(paddle.to_tensor(state["model.layers.0.mlp.up_proj.weight"]).astype("float32"))
    np.testing.assert_allclose(layer(paddle.to_tensor(x)).numpy(), x @ w.T, rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "torch_dtype" not in config and "transformers_version" not in config


def test_qwen_vl_gets_paddlemix_names(tiny_qwen_vl: Path, tmp_path: Path) -> None:
    prepare_conversion(str(tiny_qwen_vl), to="paddle").write(tmp_path / "p")
    converted, original = _tensors(tmp_path / "p"), _tensors(tiny_qwen_vl)
    pairs = {
        "transformer.llm.h.1.attn.c_attn.weight": ("transformer.h.1.attn.c_attn.weight", True),
        "transformer.llm.wte.weight": ("transformer.wte.weight", False),
        "visual.vit.conv1.weight": ("transformer.visual.conv1.weight", False),
        "visual.vit.transformer.resblocks.0.attn.in_proj.weight":
            ("transformer.visual.transformer.resblocks.0.attn.in_proj.weight", True),
        "visual.attn_pool.attn.in_proj_weight": ("transformer.visual.attn_pool.attn.in_proj_weight", True),
        "visual.attn_pool.query": ("transformer.visual.attn_pool.query", False),
        "visual.proj": ("transformer.visual.proj", False),  # x @ proj in both frameworks
        "lm_head.weight": ("lm_head.weight", True),
    }
    for new, (old, transposed) in pairs.items():
        assert np.array_equal(converted[new], original[old].T if transposed else original[old]), new
    assert not any(k.startswith(("transformer.h.", "transformer.visual.")) for k in converted)


def test_tied_model_writes_no_lm_head(tiny_qwen2_5_vl: Path, tmp_path: Path) -> None:
    prepare_conversion(str(tiny_qwen2_5_vl), to="paddle").write(tmp_path / "p")
    assert "lm_head.weight" not in _tensors(tmp_path / "p")


def test_transformers5_checkpoint_converts(tiny_qwen2_vl: Path, tiny_qwen2_vl_transformers5: Path,
                                          tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    source = tiny_qwen2_vl_transformers5
    original = _tensors(tiny_qwen2_vl)
    assert "text_config" in json.loads((source / "config.json").read_text())

    conversion = prepare_conversion(str(source), to="safetensors")
    assert conversion.plan.source_layout == "transformers-5"
    conversion.write(tmp_path / "official")
    converted = _tensors(tmp_path / "official")
    assert converted.keys() == original.keys()
    assert all(np.array_equal(converted[k], v) for k, v in original.items())
    model, info = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        tmp_path / "official", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    config = json.loads((tmp_path / "official" / "config.json").read_text())
    assert "text_config" not in config and config["rope_scaling"]["mrope_section"] == [4, 6, 6]
    assert config["hidden_size"] == 128 and config["vision_config"]["embed_dim"] == 160


def test_cast_rounds_like_torch(tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    prepare_conversion(str(tiny_qwen2_vl), to="paddle", dtype="float16").write(tmp_path / "p")
    converted, original = _tensors(tmp_path / "p"), _tensors(tiny_qwen2_vl)
    for key in ("model.embed_tokens.weight", "model.norm.weight"):
        expected = torch.from_numpy(original[key].view(np.int16)).view(torch.bfloat16).to(torch.float16).numpy()
        assert converted[key].dtype == np.float16 and np.array_equal(converted[key], expected)
    assert json.loads((tmp_path / "p" / "config.json").read_text())["dtype"] == "float16"


def test_manifest_records_source_ops_and_file_hashes(tiny_qwen_vl: Path, tmp_path: Path) -> None:
    result = prepare_conversion("tiny-qwen-vl", to="paddle").write(tmp_path / "p", max_shard_size=30_000_000)
    manifest = json.loads((tmp_path / "p" / "vlhub-manifest.json").read_text())
    assert manifest["source"]["model"] == "tiny-qwen-vl" and manifest["source"]["layout"] == "official"
    assert manifest["keymap"]["id"] == "qwen_vl" and manifest["ops"] == {"rename": 60, "transpose": 22}
    assert "model_state.pdparams.index.json" in manifest["files"]
    for name, entry in manifest["files"].items():
        assert file_sha256(tmp_path / "p" / name) == entry["sha256"], name
    assert result.out == tmp_path / "p"


def test_dry_run_plans_a_72b_model_without_any_data(tmp_path: Path) -> None:
    result = run_vlhub("convert", "qwen2.5-vl-72b", "--to", "paddle", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["tensors"] == 1353 and plan["total_bytes"] == 146821554688
    head = next(s for s in plan["steps"] if s["target"] == "lm_head.weight")
    assert head["shape_before"] == "152064x8192" and head["shape_after"] == "8192x152064"
    table = run_vlhub("convert", "tiny-qwen2-vl", "--to", "paddle", "--dry-run", "--out", str(tmp_path / "o"))
    assert "transpose" in table.stdout and not (tmp_path / "o").exists()


def test_cli_convert_and_refusals(tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    ok = run_vlhub("convert", "tiny-qwen2-vl", "--to", "paddle", "--out", str(out))
    assert ok.returncode == 0 and str(out) in ok.stdout and "converting" in ok.stderr
    again = run_vlhub("convert", "tiny-qwen2-vl", "--to", "paddle", "--out", str(out))
    assert again.returncode == 2 and "not empty" in again.stderr and "--overwrite" in again.stderr
    assert run_vlhub("convert", "tiny-qwen2-vl", "--to", "paddle", "--out", str(out), "--overwrite").returncode == 0
    unknown = run_vlhub("convert", "tiny-qwen2-vl", "--to", "onnx")
    assert unknown.returncode == 2 and "unknown target format" in unknown.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging leftovers


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_key_map_mismatch_lists_the_keys_and_writes_nothing(tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    source = tmp_path / "src"
    original = _tensors(tiny_qwen2_vl)
    del original["model.norm.weight"]
    original["model.extra.weight"] = np.zeros(4, np.uint16)
    with CheckpointWriter(source, "safetensors", [
            m for m in _metas(tiny_qwen2_vl) if m.name != "model.norm.weight"] + [
            _meta("model.extra.weight", (4,))]) as writer:
        for name, array in original.items():
            writer.write(name, array)
    shutil.copy(tiny_qwen2_vl / "config.json", source)
    with pytest.raises(UserError, match=r"1 unmatched \(model\.extra\.weight\).*1 missing \(model\.norm\.weight\)"):
        prepare_conversion(str(source), to="paddle")
    result = run_vlhub("convert", str(source), "--to", "paddle", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "model.norm.weight" in result.stderr
    assert not (tmp_path / "o").exists()


def _metas(path: Path):
    with open_checkpoint(path) as checkpoint:
        return list(checkpoint.tensors.values())


def _meta(name: str, shape: tuple[int, ...]):
    from vlhub.formats.tensors import TensorMeta

    return TensorMeta(name, "bfloat16", shape)


def test_allow_unmatched_passes_extra_tensors_through(tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    source = tmp_path / "src"
    metas = _metas(tiny_qwen2_vl) + [_meta("model.extra.weight", (4,))]
    original = {**_tensors(tiny_qwen2_vl), "model.extra.weight": np.arange(4, dtype=np.uint16)}
    with CheckpointWriter(source, "safetensors", metas) as writer:
        for meta in metas:
            writer.write(meta.name, original[meta.name])
    shutil.copy(tiny_qwen2_vl / "config.json", source)
    prepare_conversion(str(source), to="paddle", allow_unmatched=True).write(tmp_path / "o")
    assert np.array_equal(_tensors(tmp_path / "o")["model.extra.weight"], np.arange(4, dtype=np.uint16))


def test_shape_disagreeing_with_config_is_refused(tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    source = _copy(tiny_qwen2_vl, tmp_path / "src")
    config = json.loads((source / "config.json").read_text())
    config["intermediate_size"] = 512
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="mis-shaped"):
        prepare_conversion(str(source), to="paddle")


def test_unknown_family_names_the_keys_it_saw(tmp_path: Path) -> None:
    with CheckpointWriter(tmp_path / "src", "safetensors", [_meta("encoder.w", (2, 2))]) as writer:
        writer.write("encoder.w", np.zeros((2, 2), np.uint16))
    (tmp_path / "src" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="cannot tell which model family.*encoder.w"):
        prepare_conversion(str(tmp_path / "src"), to="paddle")


def test_an_interrupted_conversion_leaves_nothing(tiny_qwen2_vl: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import vlhub.convert.pipeline as pipeline

    calls = []

    def failing_transpose(array: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return array.T.copy()

    monkeypatch.setattr(pipeline, "transpose_last", failing_transpose)
    with pytest.raises(KeyboardInterrupt):
        prepare_conversion(str(tiny_qwen2_vl), to="paddle").write(tmp_path / "o")
    assert list(tmp_path.iterdir()) == []


def test_too_little_disk_is_refused_before_writing(tiny_qwen2_vl: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import vlhub.atomic as atomic

    # a full disk cannot be made on demand here; the free-space figure is what is faked
    real = shutil.disk_usage
    monkeypatch.setattr(atomic.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=10_000_000))
    with pytest.raises(UserError, match=r"not enough disk space .* need \d+(\.\d+)? MB, 10 MB is free"):
        prepare_conversion(str(tiny_qwen2_vl), to="paddle").write(tmp_path / "o")
    assert list(tmp_path.iterdir()) == []


def test_uint16_weights_without_a_bf16_config_are_refused(tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    # the Paddle trap: bf16 stored as uint16 must never be read as integers (docs/facts/paddle.md#uint16-trap)
    prepare_conversion(str(tiny_qwen2_vl), to="paddle").write(tmp_path / "p")
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    config["dtype"] = "float16"
    (tmp_path / "p" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="is uint16 .how Paddle stores bfloat16"):
        prepare_conversion(str(tmp_path / "p"), to="safetensors", dtype="float16")


def test_an_output_holding_the_source_is_refused_even_with_overwrite(tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    source = _copy(tiny_qwen2_vl, tmp_path / "parent" / "src")
    (tmp_path / "parent" / "keep.txt").write_text("keep")
    for out in (tmp_path / "parent", source):
        result = run_vlhub("convert", str(source), "--to", "paddle", "--out", str(out), "--overwrite")
        assert result.returncode == 2 and "is or contains the source" in result.stderr
    assert (tmp_path / "parent" / "keep.txt").exists() and (source / "config.json").exists()


def test_an_unwritable_output_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    result = run_vlhub("convert", "tiny-qwen2-vl", "--to", "paddle", "--out", str(tmp_path / "a-file" / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "is a file" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]
