"""`--to vamc` as a target: its options, how they settle against a model, and its hooks into `vlhub plan`, `check`
and `smoke` (the code each hook runs is in this folder)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlhub.convert.configs import official_config
from vlhub.convert.conversion import Conversion, Model, Output
from vlhub.deploy.checks import Check, LayoutContext, Need
from vlhub.deploy.target import OnBytes, Say, TargetDefaults, flag
from vlhub.family_registry import FAMILIES
from vlhub.manifest import Manifest, listed_path
from vlhub.sizes import Sizing
from vlhub.targets.vamc import check
from vlhub.targets.vamc.build import (
    DEFAULT_MAX_PIXELS,
    NAME,
    Recipe,
    VamcSpec,
    build_vamc,
    check_smoke_image_fits,
    vamc_options,
    written_bytes,
)
from vlhub.targets.vamc.plan import VamcPlan, check_patches, vamc_plan
from vlhub.targets.vamc.smoke import VamcRunner


@dataclass(frozen=True)
class VamcOptions:
    """What `vlhub convert --to vamc` takes."""

    image: tuple[str, ...] = flag("An image size you will send (repeatable); the visual N is planned to hold the "
                                  "largest (instead of --max-pixels).", default=(), metavar="WxH")
    max_pixels: str | None = flag(f"The largest image as a pixel count, e.g. 921600 for 1280x720 (default "
                                  f"{DEFAULT_MAX_PIXELS}).", metavar="N")
    prefill_len: int | None = flag("The LLM's prefill length, a multiple of 16 (default: the image's tokens plus a "
                                   "prompt, as `vlhub plan` computes).")
    max_len: int | None = flag("The LLM's context (KV cache) length, a multiple of 16 (default: computed).")
    tp: int | None = flag("Tensor parallelism, dies per LLM; divides the KV heads (default 4 where it does).")
    dtype: str | None = flag("float16, the only dtype the recipes compile.", metavar="[float16]")


class VamcTarget(TargetDefaults):
    """The VastAI VACC layout: the weight folder, yamls and embedding table vamc and vastgenx take (vamc itself
    runs elsewhere: `vlhub check` says whether it is here)."""

    name = NAME
    # the HF folder vamc's frontend.checkpoint names (build.py writes the rest of the layout around it)
    output = Output("official", "safetensors")
    options = VamcOptions
    is_layout = True
    summary = ("{weights}/ for vamc, build_in/build/*.yaml, embed_tokens.bin and compile.sh; its README.md says how "
               "to compile and serve it")
    marks = ("weights", "build_in")
    weights_glob = "weights/*"
    compile_outputs = ("vamc_results",)  # compile.sh's networks
    takes_patches = True  # the visual network's N

    def settle(self, options: VamcOptions, model: Model, *, smoke: bool) -> VamcSpec:
        settled = vamc_options(model.family, model.config, image=options.image, max_pixels=options.max_pixels,
                               prefill_len=options.prefill_len, max_len=options.max_len, tp=options.tp,
                               dtype=options.dtype)
        if smoke:
            check_smoke_image_fits(settled)
        return VamcSpec(model.family, settled)

    def written_bytes(self, weights: int, config: dict) -> int:
        return written_bytes(weights, config)

    def progress(self, conversion: Conversion, spec: VamcSpec) -> tuple[str, int]:
        return "writing the vamc layout", written_bytes(conversion.plan.total_bytes, official_config(conversion.config))

    def build(self, conversion: Conversion, spec: VamcSpec, out: Path, *, overwrite: bool,
              on_bytes: OnBytes, say: Say = None) -> Manifest:
        return build_vamc(conversion, spec, out, overwrite=overwrite, on_bytes=on_bytes)

    def smoke_runner(self, layout: Path, manifest: Manifest | None, options: object) -> VamcRunner:
        assert manifest is not None  # the registry sends layouts whose manifest names this target
        return VamcRunner(listed_path(layout, manifest.target.smoke_path or "."), layout, manifest.target)

    def plan(self, sizing: Sizing) -> VamcPlan:
        return vamc_plan(sizing)

    def check_patches(self, config: dict, patches: int) -> None:
        check_patches(config, patches)

    def vendor_files(self, family: str) -> tuple[str, ...]:
        return Recipe.of(FAMILIES[family]).vendor_files if FAMILIES[family].routes_to(NAME) else ()

    def number_checks(self, ctx: LayoutContext) -> list[Check]:
        return check.number_checks(ctx)

    def toolchain_checks(self, family: str | None, weights: Path | None) -> list[Check]:
        return check.toolchain_checks(family, weights)

    def next_needs(self, params: int, model_bytes: int, where: str) -> list[Need]:
        return check.next_needs(params, where)


VAMC = VamcTarget()
