"""What several test modules share (test modules never import each other): running the `vlhub` command, in this
process or as a real one, checkpoints broken on purpose for the smoke tests to catch, a plan's target parts, and the
tiny Qwen3-VL configs and weights the Qwen3-VL tests draw with transformers.

`run_vlhub` runs the command in this process through typer's `CliRunner`, against the same Typer app and the same
error handling (`reports_errors`, click's usage errors) the console script runs; `run_vlhub_subprocess` starts the
real `python -m vlhub` where the process itself is the point (signals, kills, exit codes of the real entry point,
what an interpreter imports, peak memory, environment read at start-up such as PYTHONPATH).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import huggingface_hub.constants as hf_constants  # imported before any test changes HF_* (see _hub_settings)
import numpy as np
from rich.console import Console
from typer.testing import CliRunner

if TYPE_CHECKING:
    import torch

    from vlhub.plan import Plan
    from vlhub.smoke.inputs import SmokeInput
    from vlhub.targets.tpu_mlir.build import TpuOptions
    from vlhub.targets.vamc.plan import VamcPlan

REPO = Path(__file__).resolve().parent.parent  # the checkout the tests run from


# --- running vlhub -------------------------------------------------------------------------------------------------


@dataclass
class Ran:
    """What a `vlhub` run gave: the attributes of `subprocess.CompletedProcess` the tests read."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


# settings a Python process reads once, when it starts: a run in this process cannot honour them
_START_UP_ONLY = ("PYTHON", "LD_")


def run_vlhub(*args: str, env: Mapping[str, str | None] | None = None) -> Ran:
    """Run `vlhub ARGS` in this process, as the console script would: `env` is applied for the run and restored
    after (a value of None removes the variable), stdout and stderr are captured apart, an uncaught exception is a
    traceback on stderr and exit 1, as Python prints it."""
    env = dict(env or {})
    start_up = [name for name in env if name.startswith(_START_UP_ONLY)]
    if start_up:
        raise ValueError(f"{', '.join(start_up)} take effect when a process starts: use run_vlhub_subprocess")
    from vlhub.cli.app import app

    result = _Runner().invoke(app, list(args), env=env, prog_name="vlhub", catch_exceptions=True)
    stderr, code = result.stderr, result.exit_code
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))  # what Python prints of an uncaught one
        code = 1
    return Ran(list(args), code, result.stdout, stderr)


def run_vlhub_subprocess(*args: str, env: Mapping[str, str] | None = None,
                         timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the real `vlhub` entry point in a fresh interpreter, as a user's shell would."""
    return subprocess.run([sys.executable, "-m", "vlhub", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def one_line_error(result: Ran | subprocess.CompletedProcess[str], code: int = 2, *,
                   after_progress: bool = False) -> str:
    """The one `error: ...` line a refused command prints, nothing on stdout; returns the line. With
    `after_progress`, for a failure met while a stage runs (a disk that fills, a file named outside the folder):
    the stage's start and step lines may come first, and the error is the last line."""
    assert result.returncode == code, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    if after_progress:
        assert "Traceback" not in result.stderr, result.stderr
        lines = lines[-1:]
        assert sum(line.startswith("error: ") for line in result.stderr.splitlines()) == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


class _Runner(CliRunner):
    """typer's CliRunner, with the state a fresh process would have built from the run's environment and streams:
    huggingface_hub's settings (read from HF_* once, at import) and vlhub's rich consoles (built at import, for
    the streams of the time)."""

    @contextlib.contextmanager
    def isolation(self, *args: object, **kwargs: object) -> Iterator[tuple]:  # type: ignore[override]
        with super().isolation(*args, **kwargs) as streams, _hub_settings(), _consoles_as_piped():  # type: ignore[arg-type]
            yield streams


@contextlib.contextmanager
def _hub_settings() -> Iterator[None]:
    """huggingface_hub.constants as the run's environment gives them (HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE...),
    restored after."""
    saved = dict(vars(hf_constants))
    importlib.reload(hf_constants)
    try:
        yield
    finally:
        vars(hf_constants).clear()
        vars(hf_constants).update(saved)


@contextlib.contextmanager
def _consoles_as_piped() -> Iterator[None]:
    """vlhub.cli._output's consoles as that module builds them when stdout and stderr are the captured streams
    (not a terminal: no colour, its pipe width), whatever the streams were when pytest first imported it; they
    find the captured streams themselves (a rich Console without a file writes to sys.stdout / sys.stderr)."""
    from vlhub.cli import _output

    spec = importlib.util.find_spec(_output.__name__)
    assert spec is not None and spec.loader is not None
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    consoles = {name: value for name, value in vars(_output).items() if isinstance(value, Console)}
    saved = {name: dict(vars(console)) for name, console in consoles.items()}
    for name, console in consoles.items():
        vars(console).update(vars(getattr(fresh, name)))
    try:
        yield
    finally:
        for name, console in consoles.items():
            vars(console).clear()
            vars(console).update(saved[name])


# --- checkpoints broken on purpose ---------------------------------------------------------------------------------

Tensors = dict[str, np.ndarray]  # official name -> float32, torch orientation


def rewrite(good: Path, out: Path, edit: Callable[[Tensors], Tensors], *, bits_as_float16: bool = False) -> Path:
    """A copy of the checkpoint at `good` (same layout, dtypes, format and files) with `edit` applied to
    its tensors, taken by official name. `bits_as_float16` stores bf16 tensors as float16 numbers equal to
    their bit patterns: the uint16 trap (docs/facts/paddle.md#uint16-trap)."""
    from vlhub.formats.registry import format_of_file
    from vlhub.formats.tensors import TensorMeta
    from vlhub.formats.writers import CheckpointWriter
    from vlhub.hub.synthetic import cast_float32
    from vlhub.smoke.weights import ModelWeights

    with ModelWeights.open(good, resident=True) as weights:
        tensors = edit({step.target.name: weights.get(step.target.name).copy() for step in weights.plan.steps})
        steps = weights.plan.steps
        fmt = weights.checkpoint.format
        raw = {step.source.name: weights.checkpoint.read(step.source.name) for step in steps}
    out.mkdir()
    metas = []
    for step in steps:
        dtype = "float16" if bits_as_float16 and step.source.dtype == "bfloat16" else step.source.dtype
        metas.append(TensorMeta(step.source.name, dtype, step.source.shape))
    with CheckpointWriter(out, fmt, metas) as writer:
        for step, meta in zip(steps, metas):
            if meta.dtype != step.source.dtype:
                writer.write(meta.name, raw[meta.name].astype(np.float16))
                continue
            values = tensors[step.target.name]
            writer.write(meta.name, cast_float32(values.T.copy() if step.transpose else values, meta.dtype))
    for extra in good.iterdir():
        if format_of_file(extra.name) is None and not extra.name.endswith(".index.json"):
            shutil.copy2(extra, out / extra.name)
    return out


def layer_prefix(tensors: Tensors) -> str:
    """Where decoder layers' names start, for the family these tensors belong to."""
    return "model.layers." if "model.norm.weight" in tensors else "transformer.h."


def untransposed_square(tensors: Tensors) -> Tensors:
    prefix = layer_prefix(tensors)
    name = prefix + ("0.attn.c_proj.weight" if prefix.startswith("transformer") else "0.self_attn.o_proj.weight")
    assert tensors[name].shape[0] == tensors[name].shape[1]
    tensors[name] = tensors[name].T.copy()
    return tensors


def q_and_k_swapped(tensors: Tensors) -> Tensors:
    prefix = layer_prefix(tensors)
    if prefix.startswith("transformer"):  # fused [q; k; v] rows
        fused = tensors[prefix + "1.attn.c_attn.weight"]
        third = fused.shape[0] // 3
        fused[:third], fused[third:2 * third] = fused[third:2 * third].copy(), fused[:third].copy()
        return tensors
    q, k = (tensors[f"{prefix}1.self_attn.{p}_proj.weight"] for p in "qk")
    # grouped-query attention: k has fewer rows than q; swap k with the q heads of its size
    q[: len(k)], k[:] = k.copy(), q[: len(k)].copy()
    return tensors


def layers_swapped(tensors: Tensors) -> Tensors:
    prefix = layer_prefix(tensors)
    first = {n: v for n, v in tensors.items() if n.startswith(prefix + "0.")}
    for name in first:
        other = prefix + "1." + name[len(prefix) + 2:]
        tensors[name], tensors[other] = tensors[other], tensors[name]
    return tensors


def merger_zeroed(tensors: Tensors) -> Tensors:
    merger = "visual.merger." if "visual.merger.ln_q.weight" in tensors else "transformer.visual.attn_pool."
    for name in tensors:
        if name.startswith(merger) and name.endswith("weight") and tensors[name].ndim == 2:
            tensors[name][:] = 0
    return tensors


def lm_head_is_embedding(tensors: Tensors) -> Tensors:
    embedding = "transformer.wte.weight" if "transformer.wte.weight" in tensors else "model.embed_tokens.weight"
    tensors["lm_head.weight"] = tensors[embedding].copy()
    return tensors


BREAKAGES: dict[str, Callable[[Tensors], Tensors]] = {
    "square Linear weight left untransposed": untransposed_square,
    "q_proj and k_proj swapped": q_and_k_swapped,
    "decoder layers 0 and 1 swapped": layers_swapped,
    "vision merger zeroed": merger_zeroed,
    "lm_head replaced by the embedding": lm_head_is_embedding,
}


# --- tiny Qwen3-VL models for transformers ------------------------------------------------------------------------

QWEN3_VOCAB = 400
QWEN3_TOKENS = {"image_token_id": 390, "video_token_id": 391, "vision_start_token_id": 392,
                "vision_end_token_id": 393}


def qwen3_text(hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int, section: list[int],
               **extra: object) -> dict:
    """A Qwen3-VL text_config: its own head_dim, interleaved M-RoPE sections, the MLP twice the hidden size."""
    return dict(vocab_size=QWEN3_VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=2 * hidden, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": section,
                                 "mrope_interleaved": True}, **extra)


def qwen3_vision(width: int, depth: int, heads: int, out: int, deepstack: list[int], positions: int = 64) -> dict:
    """A Qwen3-VL vision_config: 16-pixel patches merged 2x2, a positions-entry learned table, DeepStack blocks."""
    return {"depth": depth, "hidden_size": width, "num_heads": heads, "intermediate_size": 2 * width,
            "out_hidden_size": out, "num_position_embeddings": positions, "deepstack_visual_indexes": deepstack,
            "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2, "hidden_act": "gelu_pytorch_tanh"}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights far from transformers' 0.02-std init, so attention is not uniform, positions, norms and DeepStack
    matter and routing is decided by clear margins: norms near 1, biases near 0, tables unit normal, every other
    matrix (each expert's too) 1 / sqrt(fan-in)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("bias"):
                param.copy_(0.1 * noise)
            elif param.ndim == 1:  # norm weights
                param.copy_(1 + 0.2 * noise)
            elif name.endswith(("embed_tokens.weight", "pos_embed.weight", "mlp.gate.weight")):
                param.copy_(noise)
            elif "experts" in name:  # [E, out, in] in memory
                param.copy_(noise / math.sqrt(param.shape[-1]))
            else:
                param.copy_(noise / math.sqrt(param[0].numel()))


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    """The largest absolute difference over the largest magnitude of the expected values."""
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def hf_inputs(smoke: SmokeInput) -> dict[str, torch.Tensor]:
    """transformers' keyword inputs for a smoke input: ids, patches, grids and the image token mask."""
    import torch

    assert smoke.vision is not None
    return {
        "input_ids": torch.from_numpy(smoke.input_ids)[None],
        "pixel_values": torch.from_numpy(smoke.vision.pixel_values),
        "image_grid_thw": torch.tensor(smoke.vision.grids),
        "mm_token_type_ids": torch.from_numpy(smoke.image_mask.astype(np.int64))[None],
    }


# --- a plan's target parts -----------------------------------------------------------------------------------------


def plan_vamc(plan: Plan) -> VamcPlan | None:
    """The plan's vamc part."""
    from vlhub.targets.vamc.plan import VamcPlan

    part = plan.targets.get("vamc")
    assert part is None or isinstance(part, VamcPlan)
    return part


def plan_tpu(plan: Plan) -> TpuOptions | None:
    """The llm_convert options of the plan's tpu-mlir part."""
    from vlhub.targets.tpu_mlir.plan import TpuPlan

    part = plan.targets.get("tpu-mlir")
    assert part is None or isinstance(part, TpuPlan)
    return part.options if part else None


def plan_max_seq_len(plan: Plan) -> int | None:
    """The max_seq_len of the plan's paddle-inference part."""
    from vlhub.targets.paddle_inference.plan import PaddleInferencePlan

    part = plan.targets.get("paddle-inference")
    assert part is None or isinstance(part, PaddleInferencePlan)
    return part.max_seq_len if part else None


# --- hostile files -------------------------------------------------------------------------------------------------


def with_config_text(source: Path, target: Path, text: str | None) -> Path:
    """`source`'s weights (linked) beside a config.json of `text`, or a config.json that loops."""
    target.mkdir()
    for entry in source.iterdir():
        if entry.name != "config.json":
            (target / entry.name).symlink_to(entry)
    if text is None:
        (target / "config.json").symlink_to(target / "loop.json")
        (target / "loop.json").symlink_to(target / "config.json")
    else:
        (target / "config.json").write_text(text)
    return target


def safetensors_with_header(path: Path, header: dict | bytes, data: bytes, length: int | None = None) -> Path:
    """A .safetensors file of `header` (a dict, or raw bytes), its length field `length` if given, then `data`."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def header_entry(dtype: str, shape: list[int], begin: int, end: int, **extra: object) -> dict:
    """One tensor's entry in a safetensors header."""
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end], **extra}


def hard_link_or_copy(source: Path, destination: Path) -> None:
    """Put `source` at `destination` without copying bytes where the filesystem allows: a symlink would lead out of
    the checkpoint, which vlhub refuses (docs/safety.md)."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def transformers_qwen2_vl(directory: Path) -> Path:
    """tiny-qwen2-vl's architecture with a 2048-token vocabulary, randomly initialised and saved by transformers
    itself in bfloat16 (`save_pretrained`: safetensors shards and an index)."""
    import torch
    import transformers

    from vlhub.catalog import get_model

    config = {**copy.deepcopy(get_model("tiny-qwen2-vl").config), "vocab_size": 2048}  # transformers edits nested dicts
    config.pop("bos_token_id", None), config.pop("eos_token_id", None)  # ids of the full vocabulary
    torch.manual_seed(0)
    model = transformers.Qwen2VLForConditionalGeneration(transformers.Qwen2VLConfig(**config))
    model.to(torch.bfloat16).save_pretrained(directory, max_shard_size="300KB")  # bf16, as the released weights
    return directory


def small_sharded_source(raw: Path, out: Path) -> Path:
    """`transformers_qwen2_vl` at `raw`, as `vlhub convert --to safetensors` writes it at `out` (15 shards, an
    index, config files and a vlhub manifest); `out` returned."""
    made = run_vlhub("convert", str(transformers_qwen2_vl(raw)), "--to", "safetensors", "--out", str(out),
                     "--max-shard-size", "300KB", "--no-smoke")
    assert made.returncode == 0, made.stderr
    return out
