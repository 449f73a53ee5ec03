"""`--to paddle-inference` as a target: its options, how they settle against a model, and its hooks into `vlhub
plan`, `check` and `smoke` (the code each hook runs is in this folder)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlhub.convert.conversion import Conversion, Model, Output
from vlhub.deploy.checks import Check, LayoutContext, Need, paddle_check
from vlhub.deploy.target import OnBytes, Say, TargetDefaults, flag
from vlhub.family_registry import FAMILIES
from vlhub.manifest import Manifest
from vlhub.sizes import Sizing
from vlhub.targets.paddle_inference import check
from vlhub.targets.paddle_inference.build import (
    DEFAULT_MAX_SEQ_LEN,
    IR_SUFFIX,
    NAME,
    PaddleInferenceSpec,
    build_paddle_inference,
    check_paddle_installed,
    inference_dtype,
    layout_ir,
)
from vlhub.targets.paddle_inference.plan import PaddleInferencePlan, check_max_seq_len, paddle_inference_plan
from vlhub.targets.paddle_inference.smoke import StaticGraphRunner


def _defaults(fact: str, otherwise: str = "") -> str:
    """Each family's own default of a `[targets.paddle-inference]` fact, as option help says it."""
    own = [f"{f.route(NAME)[fact]} for {f.display_name}" for f in FAMILIES.values()
           if f.routes_to(NAME) and fact in f.route(NAME)]
    return ", ".join(own + ([otherwise] if otherwise else []))


@dataclass(frozen=True)
class PaddleInferenceOptions:
    """What `vlhub convert --to paddle-inference` takes."""

    dtype: str | None = flag("The weights' and graphs' dtype: float16, bfloat16 or float32 (default: "
                             f"{_defaults('dtype', otherwise='else the source')}).",
                             metavar="[float16|bfloat16|float32]")
    ir: str | None = flag("Graphs: pir (.json, Paddle 3's) or legacy (.pdmodel, which PaddleMIX's static predictor "
                          f"opens); default {_defaults('ir')}.", metavar=f"[{'|'.join(IR_SUFFIX)}]")
    max_seq_len: int | None = flag(f"The longest prompt plus generation the layout is for (default "
                                   f"{DEFAULT_MAX_SEQ_LEN}).")


class PaddleInferenceTarget(TargetDefaults):
    """Weights in the names Paddle's inference loaders read, and static graphs."""

    name = NAME
    # the names Paddle's inference loaders read: a family's own paddle-inference layout, else PaddleMIX's (pdparams),
    # else PaddleFormers' (the Hugging Face directory PaddleFormers and FastDeploy load: safetensors); each in the
    # format its layout declares
    output = Output(("paddle-inference", "paddlemix", "paddleformers"))
    options = PaddleInferenceOptions
    is_layout = True
    summary = "weights in {weights}/, static graphs in checkpoints/; its README.md says how to run them"
    marks = ("checkpoints", "*-inference")
    weights_glob = "*-inference"
    reads_plain_weights = True  # Paddle weights, checked as what Paddle's inference loaders read

    def settle(self, options: PaddleInferenceOptions, model: Model, *, smoke: bool) -> PaddleInferenceSpec:
        model.family.route(NAME, model.config.get("model_type"))  # a family or model type without a route stops here
        ir = layout_ir(model.family, options.ir)
        max_seq_len = DEFAULT_MAX_SEQ_LEN if options.max_seq_len is None else options.max_seq_len
        check_max_seq_len(model.family, model.config, max_seq_len)
        dtype = inference_dtype(model.family, options.dtype, model.dtype)
        return PaddleInferenceSpec(model.family, options.dtype, dtype, ir, max_seq_len)

    def require(self, spec: PaddleInferenceSpec) -> None:
        check_paddle_installed()

    def written_bytes(self, weights: int, config: dict) -> int:
        return 2 * weights  # the weights, then the graphs' parameters

    def progress(self, conversion: Conversion, spec: PaddleInferenceSpec) -> tuple[str, int]:
        return "writing the paddle inference layout", conversion.plan.total_bytes

    def build(self, conversion: Conversion, spec: PaddleInferenceSpec, out: Path, *, overwrite: bool,
              on_bytes: OnBytes, say: Say = None) -> Manifest:
        return build_paddle_inference(conversion, spec, out, overwrite=overwrite, on_bytes=on_bytes, say=say)

    def smoke_runner(self, layout: Path, manifest: Manifest | None, options: object) -> StaticGraphRunner:
        assert manifest is not None  # the registry sends layouts whose manifest names this target
        return StaticGraphRunner(layout, manifest.weights_dir(layout))

    def plan(self, sizing: Sizing) -> PaddleInferencePlan:
        return paddle_inference_plan(sizing)

    def dtype_check(self, ctx: LayoutContext, stored: str | None) -> Check | None:
        return check.dtype_check(ctx, stored)

    def number_checks(self, ctx: LayoutContext) -> list[Check]:
        return check.number_checks(ctx)

    def toolchain_checks(self, family: str | None, weights: Path | None) -> list[Check]:
        return [paddle_check(required=True, graphs=True)]

    def build_needs(self, params: int, model_bytes: int) -> list[Need]:
        return check.build_needs(params, model_bytes)

    def next_needs(self, params: int, model_bytes: int, where: str) -> list[Need]:
        return check.next_needs(model_bytes)


PADDLE_INFERENCE = PaddleInferenceTarget()
