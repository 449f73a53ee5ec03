"""The Paddle Inference deployment layout: `vlhub convert SRC --to paddle-inference`.

    DIR/
      <name>-inference/                  weights in the names and dtype Paddle's inference loaders read,
                                         config.json, generation config, tokenizer and processor files
      checkpoints/encode_image/vision.{json|pdmodel} + vision.pdiparams        static vision encoder
      checkpoints/encode_text/<prefix>.{json|pdmodel} + <prefix>.pdiparams     language model: prefill
                                         (empty cache in) and each decode step (one token and the cache in)
      vlhub-manifest.json, README.md

Everything is built in a staging directory beside DIR and renamed into place when complete. What differs by family
(the IR its consumer opens, the graphs' file prefix, the dtype its loader reads, how PaddleMIX runs it) is the
family's `[targets.paddle-inference]` facts. Sources: PaddleMIX deploy/qwen_vl/ (the Qwen-VL static layout and
predictor) and deploy/qwen2_vl/, deploy/qwen2_5_vl/; PaddleNLP's QWenInferenceModel (the names, the
bf16-as-uint16 trap).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlhub import __version__
from vlhub.atomic import staged_directory
from vlhub.convert.conversion import Conversion
from vlhub.deploy.target import OnBytes
from vlhub.errors import UserError
from vlhub.family_registry import Family
from vlhub.manifest import MANIFEST, FileEntry, Manifest, TargetRecord
from vlhub.targets.paddle_inference import NAME

IR_SUFFIX = {"pir": ".json", "legacy": ".pdmodel"}
DEFAULT_MAX_SEQ_LEN = 2048


@dataclass(frozen=True)
class PaddleInferenceSpec:
    """The layout's options, settled against the model."""

    family: Family
    given_dtype: str | None  # --dtype as given (the cache entry is keyed by it)
    dtype: str  # the weights' and the graphs' parameters' dtype
    ir: str
    max_seq_len: int
    allow_unmatched: bool = False

    def cache_key(self) -> dict[str, object]:
        # keyed by the IR written, given or defaulted, so `--ir legacy` and a family's legacy default share one entry
        return {"dtype": self.given_dtype, "ir": None if self.ir == "pir" else self.ir,
                "max_seq_len": None if self.max_seq_len == DEFAULT_MAX_SEQ_LEN else self.max_seq_len}


def layout_ir(family: Family, ir: str | None) -> str:
    """The IR the layout is written in: `ir` as given (checked), else the one the family's consumer reads."""
    if ir is None:
        return family.route(NAME)["ir"]
    if ir not in IR_SUFFIX:
        raise UserError(f"--ir {ir!r}: choose pir (writes .json, Paddle 3's default) or legacy (.pdmodel, which "
                        "PaddleMIX's static predictor opens)")
    return ir


def check_paddle_installed() -> None:
    """Refuse early, before anything is written, when the export cannot run here."""
    try:
        import vlhub.targets.paddle_inference.static  # noqa: F401 - imports paddle, quietly
    except ImportError as exc:
        raise UserError(f"--to paddle-inference exports static graphs with paddlepaddle, which is not importable "
                        f"({exc}); install it with: pip install 'vlhub[paddle]'") from None


def inference_dtype(family: Family, requested: str | None, source_dtype: str) -> str:
    """The weights' dtype for Paddle's inference loader of this family (its default, else the source's), refusing
    one it would misread."""
    facts = family.route(NAME)
    dtype = requested or facts.get("dtype", source_dtype)
    refused = facts.get("refused_dtypes", {}).get(dtype)
    if refused:
        raise UserError(f"--dtype {dtype} is refused for {family.display_name}: {refused}")
    if dtype not in ("float16", "bfloat16", "float32"):
        raise UserError(f"--dtype {dtype} is not one Paddle Inference runs; choose float16, bfloat16 or float32")
    return dtype


def build_paddle_inference(conversion: Conversion, spec: PaddleInferenceSpec, out: Path, *, overwrite: bool = False,
                           on_bytes: OnBytes = None) -> Manifest:
    """Write the conversion's weights for Paddle Inference and export its static graphs into `out`, atomically."""
    name = conversion.source.name
    weights = f"{name}-inference"
    # the weights, then the graphs' parameters (as large again); a margin for config and tokenizer files
    with staged_directory(out, conversion.source.local(), overwrite=overwrite, needed=2 * conversion.plan.total_bytes,
                          what="the weights and the static graphs") as staging:
        converted = conversion.write_into(staging / weights, on_bytes=on_bytes, published_as=out / weights)
        from vlhub.targets.paddle_inference.static import export_static

        graphs = export_static(staging / weights, staging, ir=spec.ir, dtype=spec.dtype, max_seq_len=spec.max_seq_len)
        (staging / "README.md").write_text(_readme(name, spec))
        files = {f"{weights}/{file}": entry for file, entry in converted.files.items()}
        for file in (f"{weights}/{MANIFEST}", "README.md"):
            files[file] = FileEntry.of(staging / file)
        files.update({file: FileEntry(**entry) for file, entry in graphs["files"].items()})
        target = TargetRecord(name=NAME, family=spec.family.name, dtype=spec.dtype, weights=weights,
                              details={"ir": spec.ir, "max_seq_len": spec.max_seq_len,
                                       "text_prefix": spec.family.route(NAME)["text_prefix"]})
        manifest = Manifest(converted.source, target, dict(sorted(files.items())), graphs=graphs["graphs"])
        manifest.write(staging)
    return manifest


def _readme(name: str, spec: PaddleInferenceSpec) -> str:
    suffix = IR_SUFFIX[spec.ir]
    facts = spec.family.route(NAME)
    prefix, weights, dtype, ir = facts["text_prefix"], f"{name}-inference", spec.dtype, spec.ir
    return "\n".join([
        f"# {name} for Paddle Inference",
        "",
        f"Written by vlhub {__version__} (`vlhub convert --to paddle-inference --dtype {dtype} --ir {ir}`).",
        "",
        "| path | what it is |",
        "|---|---|",
        (f"| `{weights}/` | weights ({dtype}) in the names Paddle's inference loaders read, config.json, "
         "generation config, tokenizer and processor files: the `--model_name_or_path` of the PaddleMIX and "
         "PaddleNLP scripts |"),
        (f"| `checkpoints/encode_image/vision{suffix}` + `vision.pdiparams` | static vision encoder "
         "(image in, image embeddings out) |"),
        (f"| `checkpoints/encode_text/{prefix}{suffix}` + `{prefix}.pdiparams` + `config.json` | static language "
         "model: `inputs_embeds` [1, L, H], `position_ids` and `past_key_values` [layers, 2, kv_heads, T, head_dim] "
         "in; `logits` [L, vocab] and `present_key_values` (T + L) out. The prefill passes an empty cache (T = 0), "
         "each decode step one token (L = 1); the host embeds tokens from the weights' embedding table |"),
        ("| `vlhub-manifest.json` | source, options, graph inputs and outputs, every file's sha256, the smoke "
         "verdict |"),
        "",
        "## Run it",
        "",
        ("vlhub's own predictor (CPU or GPU Paddle Inference; greedy decoding, checked against the numpy "
         "reference on the source):"),
        "",
        "```bash",
        "vlhub smoke .",
        "```",
        "",
        "Graph inputs and outputs (names, shapes, dtypes) are listed under `graphs` in vlhub-manifest.json.",
        "",
        "## Graph format",
        "",
        (f"These graphs are `{ir}` (`{suffix}` beside `.pdiparams`). vlhub's predictor (`vlhub smoke .`) and "
         "`paddle.inference.Config` given both file paths read either format. PaddleMIX's Qwen-VL static "
         "predictor (`deploy/qwen_vl/run_static_predict.py`) opens `<path>.pdmodel` only, so Qwen-VL layouts "
         "are written `legacy` unless `--ir pir` is given; PaddleMIX runs Qwen2-VL and Qwen2.5-VL from the "
         "weights directory, with no static graph, and no Paddle deployment runs Qwen3-VL from one, so theirs "
         "are written `pir`, Paddle 3's own format, unless `--ir legacy` is given."),
        "",
        facts["run"].strip().format(weights=weights, dtype=dtype),
        "",
    ])
