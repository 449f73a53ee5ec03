"""`--to tpu-mlir` as a target: its options, how they settle against a model, and its hooks into `vlhub plan`,
`check` and `smoke` (the code each hook runs is in this folder)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlhub.convert.conversion import Conversion, Model, Output
from vlhub.deploy.checks import Check, LayoutContext, Need
from vlhub.deploy.target import OnBytes, Say, TargetDefaults, flag
from vlhub.errors import UserError
from vlhub.family_registry import FAMILIES
from vlhub.manifest import Manifest, listed_path
from vlhub.sizes import Sizing
from vlhub.targets.tpu_mlir import check
from vlhub.targets.tpu_mlir.build import (
    CHIPS,
    DEFAULT_GROUP_SIZE,
    DEFAULT_SEQ_LENGTH,
    NAME,
    QUANTIZE_DTYPE,
    TpuSpec,
    build_tpu_mlir,
    check_onnx_installed,
    check_smoke_image_fits,
    tpu_facts,
    tpu_options,
)
from vlhub.targets.tpu_mlir.plan import TpuPlan, tpu_plan
from vlhub.targets.tpu_mlir.simulator import resolve_toolchain
from vlhub.targets.tpu_mlir.smoke import TpuMlirRunner, TpuSmokeOptions


def _default_pixels() -> str:
    return ", ".join("{}x{} for {}".format(*f.route(NAME)["max_pixels"], f.display_name)
                     for f in FAMILIES.values() if f.routes_to(NAME))


def _pixel_multiples() -> str:
    """Each routed family's resize multiple (patch side x merge size, from its vision defaults), as help says it."""
    by_factor: dict[int, list[str]] = {}
    for family in FAMILIES.values():
        if family.routes_to(NAME):
            vision = family.route(NAME)["vision_defaults"]
            by_factor.setdefault(vision["patch_size"] * vision["spatial_merge_size"], []).append(family.display_name)
    return ", ".join(f"{factor} for {' and '.join(names)}" for factor, names in sorted(by_factor.items()))


@dataclass(frozen=True)
class TpuMlirOptions:
    """What `vlhub convert --to tpu-mlir` takes."""

    seq_length: int | None = flag(f"Positions for the prompt, image and answer (default {DEFAULT_SEQ_LENGTH}).")
    max_pixels: str | None = flag(f"The largest image, WxH (width first, e.g. 672x896; llm_convert's own W,H is "
                                  f"read too), in multiples of the patch side x merge size ({_pixel_multiples()}; "
                                  f"default {_default_pixels()}).", metavar="WxH")
    quantize: str | None = flag(f"{', '.join(QUANTIZE_DTYPE)} (default w4bf16, or w4f16 for a float16 model).",
                                metavar=f"[{'|'.join(QUANTIZE_DTYPE)}]")
    group_size: int | None = flag(f"Weights per quantization group for w4/w8 (default {DEFAULT_GROUP_SIZE}).")
    chip: str | None = flag(f"{' (default) or '.join(CHIPS)}.", metavar=f"[{'|'.join(CHIPS)}]")
    onnx: bool = flag("Also export the older flow's ONNX networks (sophon-demo), one layer at a time, with "
                      "compile_onnx.sh; the smoke test then runs them in onnxruntime.", default=False)


class TpuMlirTarget(TargetDefaults):
    """The Hugging Face directory TPU-MLIR's llm_convert reads, and its compile scripts."""

    name = NAME
    # the Hugging Face directory llm_convert reads (build.py writes the rest of the layout around it)
    output = Output("official", "safetensors")
    options = TpuMlirOptions
    smoke_options = TpuSmokeOptions
    is_layout = True
    summary = "model/ for llm_convert and compile.sh; its README.md says how to compile and run it"
    marks = ("model", "compile.sh")
    weights_glob = "model"
    compile_outputs = ("compiled", "compiled_onnx")  # compile.sh's and compile_onnx.sh's bmodels

    def settle(self, options: TpuMlirOptions, model: Model, *, smoke: bool) -> TpuSpec:
        facts = tpu_facts(model.family, model.config)  # a family or model type without a route stops here
        if options.onnx and "onnx_refused" in facts:
            raise UserError(facts["onnx_refused"])
        settled = tpu_options(
            model.family, model.config, model.dtype,
            seq_length=DEFAULT_SEQ_LENGTH if options.seq_length is None else options.seq_length,
            max_pixels=options.max_pixels, quantize=options.quantize,
            group_size=DEFAULT_GROUP_SIZE if options.group_size is None else options.group_size,
            chip=options.chip or "bm1684x")
        if options.onnx and smoke:
            check_smoke_image_fits(settled)
        dtype = QUANTIZE_DTYPE[settled.quantize]
        return TpuSpec(model.family, settled, options.onnx, None if dtype == model.dtype else dtype, facts=facts)

    def require(self, spec: TpuSpec) -> None:
        if spec.onnx:
            check_onnx_installed()

    def progress(self, conversion: Conversion, spec: TpuSpec) -> tuple[str, int]:
        total = conversion.plan.total_bytes
        if spec.onnx:  # float32 networks: about twice the parameters' bf16 bytes, a layer's weights in two networks
            return ("writing model/ and the ONNX networks",
                    total + 4 * sum(step.target.nbytes for step in conversion.plan.steps))
        return "writing the model directory for llm_convert", total

    def build(self, conversion: Conversion, spec: TpuSpec, out: Path, *, overwrite: bool,
              on_bytes: OnBytes, say: Say = None) -> Manifest:
        return build_tpu_mlir(conversion, spec, out, overwrite=overwrite, on_bytes=on_bytes)

    def smoke_runner(self, layout: Path, manifest: Manifest | None, options: TpuSmokeOptions | None) -> TpuMlirRunner:
        assert manifest is not None  # the registry sends layouts whose manifest names this target
        toolchain = resolve_toolchain(options.tpu_mlir_python if options else None)
        return TpuMlirRunner(listed_path(layout, manifest.target.smoke_path or "model"), layout, manifest.target,
                             toolchain)

    def plan(self, sizing: Sizing) -> TpuPlan:
        return tpu_plan(sizing)

    def dtype_check(self, ctx: LayoutContext, stored: str | None) -> Check | None:
        return check.dtype_check(ctx, stored)

    def number_checks(self, ctx: LayoutContext) -> list[Check]:
        return check.number_checks(ctx)

    def toolchain_checks(self, family: str | None, weights: Path | None) -> list[Check]:
        return check.toolchain_checks()

    def next_needs(self, params: int, model_bytes: int, where: str) -> list[Need]:
        return check.next_needs(params, where)


TPU_MLIR = TpuMlirTarget()
