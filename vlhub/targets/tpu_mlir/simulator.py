"""The simulator stage of a TPU-MLIR layout's smoke test: compile model/ with llm_convert (the layout's compile.sh)
and run the bmodel's first greedy token on TPU-MLIR's cmodel simulator, on the smoke image and prompt.

    python = resolve_toolchain(None)      # --tpu-mlir-python, else $VLHUB_TPU_MLIR_PYTHON; None: no toolchain
    result = simulate_first_token(layout, python, smoke_input(config), reference_logits)
    result.passed, result.stage()

Pass rule: the bmodel's own token (its lm_head network: bf16 matmul and fused top-1, on the cmodel) equals the
reference's first greedy token. Diagnostics, never a pass: the float32 logits computed here from the cmodel's last
hidden state (lm_head.weight of model/ @ that state; llm_convert fuses the final norm into the last block), their
figures against the reference's logits, and, when those choose the reference's token but the bmodel did not, the
near-tie explanation: bf16 logits cannot order two choices closer than their rounding step.

The toolchain's Python 3.10 runs cmodel_runner.py (numpy and tpu_mlir only) on the inputs built here, padded
to the networks' fixed shapes (or, for networks llm_convert compiled --dynamic, at the real rows). One token takes
minutes: lm_head over a 151936-word vocabulary dominates. Sources: TPU-MLIR python/llm/ (llm_convert's networks),
LLM-TPU models/Qwen2_VL and models/Qwen3_VL python_demo (how they are fed); the toolchain's setup:
docs/targets/tpu-mlir.md in vlhub's source, section 'The TPU-MLIR toolchain'.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlhub.errors import CheckFailed, UserError
from vlhub.manifest import MANIFEST, Manifest, TargetRecord, listed_path
from vlhub.owned import scratch_directory
from vlhub.smoke.inputs import DEVICE_MASKED, SmokeInput, VisionGeometry, VisionInputs, pad_rows, padded_mask
from vlhub.smoke.reference import ReferenceForward, causal_mask
from vlhub.smoke.verdict import TOLERANCES, Stage, compare_arrays
from vlhub.smoke.weights import ModelWeights
from vlhub.targets.tpu_mlir import NAME
from vlhub.targets.tpu_mlir.build import TOOLCHAIN_INSTALL, TORCH_FIRST
from vlhub.targets.tpu_mlir.cmodel_runner import PREFIX

TOOLCHAIN_ENV = "VLHUB_TPU_MLIR_PYTHON"
TOOLCHAIN_VERSION = "3.10"  # the tpu-mlir wheel's Requires-Python
INSTALL = f"install {TORCH_FIRST}, then {TOOLCHAIN_INSTALL}"
RUNNER = Path(__file__).with_name("cmodel_runner.py")
STAGE = "simulator"
_PROBE_SECONDS = 60

Status = Callable[[str], None]


class SimulatorFailed(CheckFailed):
    """The bmodel did not run to a token on the simulator: a failed stage, not a usage error."""


def resolve_toolchain(option: str | None) -> str | None:
    """The TPU-MLIR toolchain's interpreter: `option` (--tpu-mlir-python), else $VLHUB_TPU_MLIR_PYTHON, else None.
    A named one must exist, be Python 3.10 and import tpu_mlir; otherwise UserError says what to do."""
    given = option or os.environ.get(TOOLCHAIN_ENV) or None
    if given is None:
        return None
    source = "--tpu-mlir-python" if option else TOOLCHAIN_ENV
    found = shutil.which(os.path.expanduser(given))
    if found is None:
        raise UserError(f"{source} {given}: no such interpreter; point it at the python3.10 that has tpu-mlir "
                        f"installed ({INSTALL})")
    python = os.path.abspath(found)  # not resolved: a venv's python is a link to its base interpreter
    try:
        probe = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2]); import tpu_mlir"],
                               capture_output=True, text=True, timeout=_PROBE_SECONDS, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"{source} {given} does not run as a Python interpreter ({exc})") from None
    version = probe.stdout.partition("\n")[0].strip()
    if version != TOOLCHAIN_VERSION:
        said = f"is Python {version}" if version[:1].isdigit() else "is not a Python interpreter"
        raise UserError(f"{source} {given} {said}; the tpu-mlir wheel installs on Python {TOOLCHAIN_VERSION} only: "
                        f"point it at a python{TOOLCHAIN_VERSION} with tpu-mlir ({INSTALL})")
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"tpu_mlir is not importable by {python} ({reason}): install {TORCH_FIRST}, then {python} -m "
                        f"{TOOLCHAIN_INSTALL}")
    return python


def tpu_mlir_target(layout: Path) -> TargetRecord | None:
    """The manifest's `target` of a `vlhub convert --to tpu-mlir` layout, or None for anything else."""
    manifest = Manifest.read(Path(layout))
    return manifest.target if manifest is not None and manifest.target.name == NAME else None


def ensure_bmodel(layout: Path, python: str, status: Status | None = None) -> Path:
    """The newest compiled/*.bmodel of the layout, compiling it first with compile.sh when there is none
    (its output goes to compiled/compile.log). A compile that fails raises UserError with its last error line."""
    compiled = Path(layout) / "compiled"
    found = _newest_bmodel(compiled)
    if found is not None:
        return found
    script = Path(layout) / "compile.sh"
    if not script.is_file():
        raise UserError(f"{layout} has no compile.sh: convert it again with vlhub convert --to tpu-mlir")
    if status:
        status(f"{STAGE}: compiling model/ with llm_convert (compile.sh)")
    compiled.mkdir(exist_ok=True)
    log = compiled / "compile.log"
    with log.open("w") as out:
        done = subprocess.run(["bash", str(script)], stdout=out, stderr=subprocess.STDOUT, check=False,
                              env={**os.environ, TOOLCHAIN_ENV: python})
    found = _newest_bmodel(compiled)
    if done.returncode != 0 or found is None:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error: ")]  # compile.sh's own checks: what to do
        reason = errors[-1][len("error: "):] if errors else (lines[-1] if lines else f"exit {done.returncode}")
        raise UserError(f"compile.sh failed: {reason} (its output: {log})")
    return found


def _newest_bmodel(compiled: Path) -> Path | None:
    bmodels = sorted(compiled.glob("*.bmodel"), key=lambda path: path.stat().st_mtime)
    return bmodels[-1] if bmodels else None


def check_fits(smoke: SmokeInput, seq_length: int, patches: int, config: dict | None = None) -> VisionInputs:
    """Refuse a bmodel whose ViT rows or sequence cannot hold the smoke image and prompt; its vision inputs. With
    the model's `config`, the refusal gives the --max-pixels of the smoke image as the processor resized it."""
    vision = smoke.vision
    if vision is None:
        raise UserError("the simulator runs bmodels whose ViT takes patch rows; this input has no vision patches")
    if len(vision.pixel_values) > patches:
        example = "168x112"  # tiny-qwen2-vl's smoke image
        if config is not None and len(vision.grids) == 1:
            _, rows, columns = vision.grids[0]
            patch = VisionGeometry.from_config(config).patch
            example = f"{columns * patch}x{rows * patch}"
        raise UserError(f"the smoke image is {len(vision.pixel_values)} patches and this bmodel's ViT takes "
                        f"{patches}: convert with a --max-pixels that holds it, e.g. {example}")
    if len(smoke.input_ids) > seq_length:
        raise UserError(f"the smoke prompt is {len(smoke.input_ids)} tokens, more than the bmodel's --seq-length "
                        f"{seq_length}")
    return vision


def simulator_inputs(smoke: SmokeInput, config: dict, seq_length: int, patches: int, *,
                     dynamic: bool = False) -> dict[str, np.ndarray]:
    """What cmodel_runner.py feeds the networks for the smoke prompt, by llm_convert's input names. Static networks
    (llm_convert without --dynamic): the image's patches, positions and masks padded to the ViT's `patches` rows
    (the padding one more segment, seen only by itself), the prompt padded to `seq_length` with a causal mask over
    its real tokens. Dynamic ones (`dynamic`: the ViT and the prefill blocks take the real rows and build their own
    masks): the image's rows and the prompt's positions as they are, the token ids still padded (the embedding is
    static). A tower with a learned position table also gets its four taps per patch (`pos_idx`, `pos_weight`)."""
    vision = check_fits(smoke, seq_length, patches, config)
    count, length = len(vision.pixel_values), len(smoke.input_ids)
    unit = VisionGeometry.from_config(config).merge ** 2
    pixels, positions = vision.pixel_values, vision.position_ids
    vit_rows = count if dynamic else patches
    inputs: dict[str, np.ndarray] = {"image_rows": np.flatnonzero(smoke.image_mask), "last": np.int64(length - 1)}
    if vision.interp_indices is not None and vision.interp_weights is not None:  # Qwen3-VL's resampled table
        inputs["vit.pos_idx"] = pad_rows(vision.interp_indices.astype(np.int32), vit_rows)
        inputs["vit.pos_weight"] = pad_rows(vision.interp_weights.astype(np.float32), vit_rows)[:, :, None]
    if vision.window_index is not None:  # Qwen2.5-VL: patches in window order, merged rows put back by the ViT
        assert vision.window_mask is not None and vision.reverse_index is not None
        pixels, positions = (rows.reshape(-1, unit, rows.shape[-1])[vision.window_index].reshape(rows.shape)
                             for rows in (pixels, positions))
        inputs["vit.window_attn_mask"] = padded_mask(vision.window_mask, patches)[None, None]
        inputs["vit.reverse_index"] = np.concatenate(
            [vision.reverse_index, np.arange(count // unit, patches // unit)]).astype(np.int32)
    inputs["vit.input_states"] = pad_rows(pixels.astype(np.float32), vit_rows)
    inputs["vit.position_ids"] = pad_rows(positions.astype(np.int32), vit_rows)
    inputs["input_ids"] = pad_rows(smoke.input_ids.astype(np.int32), seq_length)[None]
    if dynamic:
        inputs["position_ids"] = smoke.position_ids.astype(np.int32)
        return inputs
    full_mask = padded_mask(vision.full_mask, patches)[None, None]
    inputs["vit.full_attn_mask"] = full_mask
    inputs["vit.attention_mask"] = full_mask  # the name Qwen3VLConverter's static ViT gives it
    inputs["position_ids"] = np.pad(smoke.position_ids.astype(np.int32), ((0, 0), (0, seq_length - length)))
    mask = np.full((seq_length, seq_length), DEVICE_MASKED, dtype=np.float32)
    mask[:length, :length] = np.where(causal_mask(length, 0) < 0, DEVICE_MASKED, 0)
    inputs["attention_mask"] = mask[None, None]
    return inputs


@dataclass
class SimulatorResult:
    """The bmodel's first token on the cmodel, the reference's, and the float32 diagnostics."""

    chip: str
    token: int  # the bmodel's lm_head (bf16, fused top-1)
    reference_token: int
    host_token: int  # argmax of host_logits
    host_logits: np.ndarray  # float32 lm_head.weight @ the cmodel's last hidden state
    reference_logits: np.ndarray
    image_cosine: float | None = None  # the cmodel's vision embeddings vs the reference's
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.token == self.reference_token

    def near_tie(self) -> str:
        """Why a bf16 token can differ from the reference's while the hidden state is right, or ""."""
        if self.passed or self.host_token != self.reference_token:
            return ""
        top = float(self.reference_logits[self.reference_token])
        margin = top - float(self.reference_logits[self.token])
        step = 2.0 ** (math.floor(math.log2(abs(top))) - 7) if top else 0.0  # bf16 keeps 8 significant bits
        return (f"a near tie: the reference ranks {self.token} {margin:.3g} below {self.reference_token}, "
                f"against bf16's step of {step:.3g} at that logit, and float32 logits from the cmodel's last hidden "
                "state choose the reference's token")

    def stage(self) -> Stage:
        """The smoke report's "simulator" stage: figures of the float32 host logits against the reference's,
        top-1 agreement and verdict of the bmodel's own token."""
        figures = compare_arrays(STAGE, self.reference_logits[None], self.host_logits[None], TOLERANCES["bfloat16"])
        parts = [(f"{self.chip} cmodel token {self.token}, reference {self.reference_token}, float32 logits from the "
                  f"cmodel's hidden state {self.host_token}")]
        if self.image_cosine is not None:
            parts.append(f"vision embeddings cosine {self.image_cosine:.5f}")
        parts.append(", ".join(f"{name} {seconds:.0f} s" for name, seconds in self.seconds.items()))
        if self.near_tie():
            parts.append(self.near_tie())
        return Stage(STAGE, self.passed, figures.max_abs_diff, figures.relative, figures.cosine,
                     float(self.passed), "; ".join(parts))


def simulate_first_token(layout: Path, python: str, smoke: SmokeInput, reference_logits: np.ndarray,
                         reference_image_embeds: np.ndarray | None = None, *,
                         status: Status | None = None) -> SimulatorResult:
    """Compile the tpu-mlir layout if need be, run its bmodel's first token on the cmodel for `smoke`, and compare
    it with the reference's (`reference_logits`: the reference's logits for that token, [vocab]). `python` is a
    resolve_toolchain() answer. Raises UserError when it cannot run (not a layout, compile fails) and
    SimulatorFailed when the bmodel does not run to a token."""
    layout = Path(layout)
    target = tpu_mlir_target(layout)
    if target is None:
        raise UserError(f"{layout} is not a vlhub convert --to tpu-mlir layout (its {MANIFEST} says otherwise)")
    with ModelWeights.open(listed_path(layout, target.smoke_path or "model")) as weights:
        inputs = simulator_inputs(smoke, weights.config, target.details["seq_length"], target.details["vision_patches"],
                                  dynamic=bool(target.details.get("dynamic")))
        seconds: dict[str, float] = {}
        compiling, started = _newest_bmodel(layout / "compiled") is None, time.monotonic()
        bmodel = ensure_bmodel(layout, python, status)
        if compiling:
            seconds["compile"] = time.monotonic() - started
        started = time.monotonic()
        result = _run_runner(python, bmodel, inputs, target.details["chip"], status, scratch_beside=layout)
        seconds["cmodel"] = time.monotonic() - started
        seconds["of which lm_head"] = json.loads(str(result["seconds"])).get("lm_head", 0.0)
        host_logits = ReferenceForward(weights)._project(result["hidden"][None])[0]
    image_cosine = None
    if reference_image_embeds is not None and result["image_embeds"].shape == reference_image_embeds.shape:
        image_cosine = compare_arrays("", reference_image_embeds, result["image_embeds"], TOLERANCES["bfloat16"]).cosine
    return SimulatorResult(target.details["chip"], int(result["token"]), int(np.argmax(reference_logits)),
                           int(np.argmax(host_logits)), host_logits, np.asarray(reference_logits, dtype=np.float32),
                           image_cosine, seconds)


def _run_runner(python: str, bmodel: Path, inputs: dict[str, np.ndarray], chip: str,
                status: Status | None, *, scratch_beside: Path) -> dict[str, np.ndarray]:
    """cmodel_runner.py under the toolchain's Python; its progress lines go to `status`."""
    with scratch_directory(scratch_beside) as work:
        given, answer = work / "inputs.npz", work / "result.npz"
        np.savez(given, **inputs)
        command = [python, str(RUNNER), str(bmodel), str(given), str(answer), "--chip", chip]
        tail: deque[str] = deque(maxlen=4)
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace") as process:
            assert process.stdout is not None
            for line in process.stdout:
                line = line.rstrip()
                tail.append(line)
                if status and line.startswith(PREFIX):
                    status(f"{STAGE}: {line[len(PREFIX):]}")
        if process.returncode != 0 or not answer.is_file():
            shown = " | ".join(line for line in tail if line.strip())
            raise SimulatorFailed(f"the bmodel did not run on the cmodel (exit {process.returncode}): {shown}")
        with np.load(answer) as stored:
            return {name: stored[name] for name in stored.files}
