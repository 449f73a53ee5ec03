"""The Paddle Inference deployment layout: `vlhub convert SRC --to paddle-inference`.

    DIR/
      <name>-inference/                  weights in the names and dtype Paddle's inference loaders read,
                                         config.json, generation config, tokenizer and processor files
      checkpoints/encode_image/vision.{json|pdmodel} + vision.pdiparams        static vision encoder
      checkpoints/encode_text/<prefix>.{json|pdmodel} + <prefix>.pdiparams     language model: prefill
                                         (empty cache in) and each decode step (one token and the cache in)
      vlhub-manifest.json, README.md

Everything is built in a staging directory beside DIR and renamed into place when complete.
Sources: PaddleMIX deploy/qwen_vl/ (the Qwen-VL static layout and predictor) and deploy/qwen2_vl/,
deploy/qwen2_5_vl/; PaddleNLP's QWenInferenceModel (the names, the bf16-as-uint16 trap).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from vlhub import __version__
from vlhub.atomic import staged_directory
from vlhub.convert.configs import official_config
from vlhub.convert.conversion import MANIFEST, Conversion, prepare_conversion
from vlhub.errors import UserError
from vlhub.formats.writers import file_entry, write_json_atomic
from vlhub.hub.store import conversion_output
from vlhub.plan import check_max_seq_len
from vlhub.targets.base import DeployedLayout, Deployment
from vlhub.units import now_iso

IR_SUFFIX = {"pir": ".json", "legacy": ".pdmodel"}
# the graphs each family's documented consumer opens: PaddleMIX's Qwen-VL static predictor
# (deploy/qwen_vl/run_static_predict.py) loads `<path>.pdmodel`; Qwen2(.5)-VL's PaddleMIX scripts run from the
# weights directory, so only vlhub's own predictor reads their graphs, and it reads either: Paddle 3's own pir
DEFAULT_IR = {"qwen_vl": "legacy", "qwen2_vl": "pir", "qwen2_5_vl": "pir"}
TEXT_PREFIX = {"qwen_vl": "qwen", "qwen2_vl": "model", "qwen2_5_vl": "model"}
DEFAULT_DTYPE = {"qwen_vl": "float16"}  # the others keep the source's dtype
DEFAULT_MAX_SEQ_LEN = 2048
# PaddleMIX's deploy scripts for the families it runs from the weights directory (its deploy/<family>/)
DEPLOY_SCRIPT = {"qwen2_vl": "qwen2_vl/single_image_infer.py", "qwen2_5_vl": "qwen2_5_vl/qwen2_5_vl_infer.py"}


def layout_ir(family: str, ir: str | None) -> str:
    """The IR the layout is written in: `ir` as given (checked), else the one the family's consumer reads."""
    if ir is None:
        return DEFAULT_IR[family]
    if ir not in IR_SUFFIX:
        raise UserError(f"--ir {ir!r}: choose pir (writes .json, Paddle 3's default) or legacy (.pdmodel, which "
                        "PaddleMIX's Qwen-VL static predictor opens)")
    return ir


def check_paddle_installed() -> None:
    """Refuse early, before anything is written, when the export cannot run here."""
    try:
        import vlhub.targets.paddle_inference.static  # noqa: F401 - imports paddle, quietly
    except ImportError as exc:
        raise UserError(f"--to paddle-inference exports static graphs with paddlepaddle, which is not importable "
                        f"({exc}); install it with: pip install 'vlhub[paddle]'") from None


def inference_dtype(family: str, requested: str | None, source_dtype: str) -> str:
    """The weights' dtype for Paddle's inference loader of this family, refusing one it would misread."""
    dtype = requested or DEFAULT_DTYPE.get(family, source_dtype)
    if family == "qwen_vl" and dtype == "bfloat16":
        raise UserError(
            "--dtype bfloat16 is refused for Qwen-VL: pdparams store bf16 as uint16, and PaddleNLP's "
            "QWenInferenceModel converts those numbers with to_tensor(x, dtype=float16), so bf16 1.0 would "
            "load as 16256.0; use --dtype float16 (the default) or float32")
    if dtype not in ("float16", "bfloat16", "float32"):
        raise UserError(f"--dtype {dtype} is not one Paddle Inference runs; choose float16, bfloat16 or float32")
    return dtype


def build_paddle_inference(
    source: str,
    out: Path | None = None,
    *,
    dtype: str | None = None,
    ir: str | None = None,
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
    overwrite: bool = False,
    on_bytes: Callable[[int], None] | None = None,
) -> DeployedLayout:
    """Convert SRC's weights for Paddle Inference and export its static graphs into DIR, atomically (`ir`
    None: the family's DEFAULT_IR)."""
    probe = prepare_conversion(source, to="paddle-inference")  # headers only: the family and dtype
    if probe.checkpoint is not None:
        probe.checkpoint.close()
    family = probe.plan.family
    _check(family, official_config(probe.config), probe.output_dtype(), True, dtype=dtype, ir=ir,
           max_seq_len=max_seq_len)
    ir = layout_ir(family, ir)
    chosen = inference_dtype(family, dtype, probe.output_dtype())
    conversion = prepare_conversion(source, to="paddle-inference", dtype=chosen)
    out = Path(out) if out else layout_output(conversion, dtype=dtype, ir=ir, max_seq_len=max_seq_len)
    name = _model_name(conversion)
    # the weights, then the graphs' parameters (as large again); a margin for config and tokenizer files
    with staged_directory(out, conversion.source_path, overwrite=overwrite, needed=2 * conversion.plan.total_bytes,
                          what="the weights and the static graphs") as staging:
        weights_dir = staging / f"{name}-inference"
        conversion.write(weights_dir, on_bytes=on_bytes, published_as=out / weights_dir.name)
        from vlhub.targets.paddle_inference.static import export_static

        graphs = export_static(weights_dir, staging, ir=ir, dtype=chosen, max_seq_len=max_seq_len)
        manifest = _manifest(conversion, staging, name, family, chosen, ir, max_seq_len, graphs)
        (staging / "README.md").write_text(_readme(name, family, chosen, ir, manifest))
        manifest["files"]["README.md"] = file_entry(staging / "README.md")
        write_json_atomic(staging / MANIFEST, manifest)
    return DeployedLayout(out, manifest)


def layout_output(conversion: Conversion, *, dtype: str | None = None, ir: str | None = None,
                  max_seq_len: int = DEFAULT_MAX_SEQ_LEN) -> Path:
    """Where the layout goes without --out: the cache for a catalog model (keyed by the options), else beside
    the source."""
    # keyed by the IR written, given or defaulted, so `--ir legacy` and Qwen-VL's default share one entry
    written = layout_ir(conversion.plan.family, ir)
    options = {"dtype": dtype, "ir": None if written == "pir" else written,
               "max_seq_len": None if max_seq_len == DEFAULT_MAX_SEQ_LEN else max_seq_len}
    return conversion_output(conversion.model, conversion.source_path, "paddle-inference", options)


def _model_name(conversion: Conversion) -> str:
    if conversion.model is not None:
        return conversion.model.name
    path = conversion.source_path
    assert path is not None
    return (path if path.is_dir() else path.parent).name


def _manifest(conversion: Conversion, staging: Path, name: str, family: str, dtype: str, ir: str,
              max_seq_len: int, graphs: dict) -> dict:
    weights_manifest = json.loads((staging / f"{name}-inference" / MANIFEST).read_text())
    files = {f"{name}-inference/{file}": entry for file, entry in weights_manifest["files"].items()}
    files[f"{name}-inference/{MANIFEST}"] = file_entry(staging / f"{name}-inference" / MANIFEST)
    files.update(graphs["files"])
    return {
        "vlhub_version": __version__,
        "created": now_iso(),
        "source": weights_manifest["source"],
        "target": {"name": "paddle-inference", "family": family, "dtype": dtype, "ir": ir,
                   "max_seq_len": max_seq_len, "weights": f"{name}-inference",
                   "text_prefix": TEXT_PREFIX[family]},
        "graphs": graphs["graphs"],
        "files": files,
    }


def _readme(name: str, family: str, dtype: str, ir: str, manifest: dict) -> str:
    suffix = IR_SUFFIX[ir]
    prefix = TEXT_PREFIX[family]
    weights = f"{name}-inference"
    lines = [
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
         "weights directory, with no static graph, so theirs are written `pir`, Paddle 3's own format, unless "
         "`--ir legacy` is given."),
        "",
    ]
    if family == "qwen_vl":
        lines += [
            ("PaddleMIX's static predictor (`deploy/qwen_vl/run_static_predict.py`) hard-codes the `.pdmodel` "
            "suffix (this layout's default, `--ir legacy`) and runs the language graph PaddleNLP's "
            "`llm/predict/export_model.py --inference_model` writes, with its GPU-only fused ops; the "
            "language graphs here are vlhub's own and do not take that graph's inputs. On a GPU machine "
            "with PaddleNLP, export that graph from these weights (it replaces vlhub's language graph), then run the "
             "predictor on the three paths:"),
            "",
            "```bash",
            (f"python llm/predict/export_model.py --model_name_or_path ./{weights} "
            "--output_path ./checkpoints/encode_text/ --dtype float16 --inference_model "
            "--model_prefix qwen --model_type qwen-img2txt"),
            ("python deploy/qwen_vl/run_static_predict.py --first_model_path ./checkpoints/encode_image/vision "
            f"--second_model_path ./checkpoints/encode_text/qwen --model_name_or_path ./{weights}"),
            "```",
            "",
        ]
    else:
        lines += [
            ("PaddleMIX runs Qwen2-VL / Qwen2.5-VL from the weights directory (vision in dygraph, the LLM through "
            "PaddleNLP's block-attention inference model; GPU):"),
            "",
            "```bash",
            (f"python deploy/{DEPLOY_SCRIPT[family]} --model_name_or_path ./{weights} "
            f"--dtype {dtype} --block_attn True --inference_model True --mode dynamic"),
            "```",
            "",
        ]
    return "\n".join(lines)


def _check(family: str, config: dict, source_dtype: str, smoke: bool, *, dtype: str | None = None,
           ir: str | None = None, max_seq_len: int = DEFAULT_MAX_SEQ_LEN) -> None:
    """Refuse options the layout cannot be built with, and a machine without paddlepaddle, before any work."""
    layout_ir(family, ir)
    check_max_seq_len(family, config, max_seq_len)
    inference_dtype(family, dtype, source_dtype)
    check_paddle_installed()


DEPLOYMENT = Deployment(
    name="paddle-inference",
    options=("dtype", "ir", "max_seq_len"),
    check=_check,
    output=layout_output,
    build=build_paddle_inference,
    progress=lambda conversion, **_options: ("converting the weights for paddle inference",
                                             conversion.plan.total_bytes),
    summary="weights in {weights}/, static graphs in checkpoints/; its README.md says how to run them",
)
