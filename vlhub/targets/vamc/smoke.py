"""The smoke test of a vamc layout (`vlhub.targets.vamc.build`), without VastAI hardware:

- embed_tokens.bin: the rows of the smoke prompt's tokens equal the source's embedding rows (as float16);
- the vision tower exported to ONNX in the vacc input form (`export_vacc_vision`) at the layout's N, fed the
  smoke image padded to N rows with host-built masks and cos/sin, matches the reference's image embeddings
  on the real patches (run in onnxruntime);
- the two yamls' numbers pass `vamc_problems`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlhub.family_registry import FAMILIES
from vlhub.manifest import TargetRecord, listed_path
from vlhub.owned import scratch_directory
from vlhub.smoke.inputs import SmokeInput, pad_rows, padded_mask, smoke_input
from vlhub.smoke.reference import ReferenceForward, vision_rotary
from vlhub.smoke.run import RuntimeMissing, Status
from vlhub.smoke.verdict import TOLERANCES, SmokeReport, Stage, compare_arrays
from vlhub.smoke.weights import ModelWeights
from vlhub.targets.vamc.build import vamc_problems, vision_head_dim


@dataclass
class VamcRunner:
    """The vamc layout at `layout`, its weight folder `artifact` and what its manifest records. vamc has no runtime
    here: its own checks stand in, and the language model is reported as not run."""

    artifact: Path
    layout: Path
    record: TargetRecord

    def run(self, reference: Path, tokens: int, streamed: bool | None, say: Status) -> SmokeReport:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise RuntimeMissing(f"the vamc smoke test runs the vision network in onnxruntime, which is not "
                                 f"importable ({exc}); install it with: pip install 'vlhub[onnx]'") from None
        report = vamc_smoke(self.layout, self.record, reference, say)
        report.skipped.append(Stage("language model", False, detail="vamc compiles and runs it on VastAI's "
                                                                   "toolchain and cards, not here"))
        return report


def vamc_smoke(layout: Path, target: TargetRecord, reference_path: Path, status: Status) -> SmokeReport:
    """Run the three checks on the layout at `layout` (its manifest's `target`) against the checkpoint at
    `reference_path`."""
    assert target.weights is not None
    report = SmokeReport(str(layout), str(reference_path), "onnxruntime", False, "exact")
    with ModelWeights.open(reference_path) as reference:
        smoke = smoke_input(reference.config)
        status("reference: embedding rows and image embeddings")
        forward = ReferenceForward(reference)
        expected_rows = reference.rows("model.embed_tokens.weight", smoke.input_ids).astype(np.float16)
        expected_embeds = forward.encode_images(smoke)
    report.stages.append(_embedding_rows(listed_path(layout, target.details["embed_tokens"]), smoke, expected_rows))
    status("vacc vision network: export and onnxruntime")
    with ModelWeights.open(listed_path(layout, target.weights)) as weights, \
            scratch_directory(layout) as scratch:
        produced = _vacc_vision(weights, scratch, smoke, target.details["visual"]["patches"])
    report.stages.append(compare_arrays("vision embeddings (vacc ONNX)", expected_embeds, produced,
                                        TOLERANCES[report.precision]))
    problems = vamc_problems(layout)
    report.stages.append(Stage("yaml numbers", not problems, detail="; ".join(problems)))
    return report


def _embedding_rows(path: Path, smoke: SmokeInput, expected: np.ndarray) -> Stage:
    """The prompt's rows of the raw [vocab, hidden] float16 file against the reference's, bit for bit."""
    size = path.stat().st_size if path.is_file() else 0
    hidden = expected.shape[1]
    if size % (2 * hidden):
        return Stage("embed_tokens.bin rows", False, detail=f"{size} bytes is not a whole number of {hidden}-wide "
                                                             "float16 rows")
    table = np.memmap(path, dtype="<f2", mode="r", shape=(size // (2 * hidden), hidden))
    if int(smoke.input_ids.max()) >= len(table):
        return Stage("embed_tokens.bin rows", False, detail=f"{len(table)} rows; the prompt uses id "
                                                             f"{int(smoke.input_ids.max())}")
    rows = np.asarray(table[smoke.input_ids])
    differ = int((rows.view(np.uint16) != expected.view(np.uint16)).any(axis=1).sum())
    diff = float(np.abs(rows.astype(np.float32) - expected.astype(np.float32)).max())
    return Stage("embed_tokens.bin rows", differ == 0, max_abs_diff=diff,
                 detail=f"{differ} of {len(rows)} rows differ from the source's" if differ else "")


def _vacc_vision(weights: ModelWeights, scratch: Path, smoke: SmokeInput, patches: int) -> np.ndarray:
    """The smoke image through the exported vacc vision network, in the reference's token order."""
    import onnxruntime as ort

    from vlhub.targets.vamc.onnx_vision import export_vacc_vision

    vision = smoke.vision
    assert vision is not None
    config = weights.config
    windows = FAMILIES[weights.family].vision.window_attention
    unit = config["vision_config"].get("spatial_merge_size", 2) ** 2
    cos, sin = vision_rotary(vision.position_ids, vision_head_dim(config))
    pixels = vision.pixel_values.astype(np.float32)
    inputs: dict[str, np.ndarray] = {}
    if windows:  # the host orders patches by window and the output back (VastModelZOO's modeling_qwen2_5_vl_vacc.py)
        assert vision.window_index is not None and vision.window_mask is not None
        pixels, cos, sin = (a.reshape(-1, unit, a.shape[-1])[vision.window_index].reshape(a.shape)
                            for a in (pixels, cos, sin))
        inputs["window_attention_mask"] = _attend(vision.window_mask, patches)
    inputs.update(pixel_values=pad_rows(pixels, patches), attention_mask=_attend(vision.full_mask, patches),
                  cos=pad_rows(cos, patches), sin=pad_rows(sin, patches))
    path = export_vacc_vision(weights, scratch, patches)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    out = session.run(None, inputs)[0][: len(vision.pixel_values) // unit]
    return out[vision.reverse_index] if windows else out


def _attend(mask: np.ndarray, rows: int) -> np.ndarray:
    """An additive [n, n] mask as vacc's [1, rows, rows] 1 (attend) / 0, the padding rows a segment of their own."""
    return (padded_mask(mask, rows) == 0).astype(np.float32)[None]
