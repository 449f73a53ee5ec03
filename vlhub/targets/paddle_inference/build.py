"""The Paddle Inference deployment layout: `vlhub convert SRC --to paddle-inference`.

    DIR/
      <name>-inference/                  weights in the names and dtype Paddle's inference loaders read,
                                         config.json, generation config, tokenizer and processor files
      checkpoints/encode_image/vision.{json|pdmodel} + vision.pdiparams        static vision encoder
      checkpoints/encode_text/<prefix>_layer_<i>.{json|pdmodel} + .pdiparams    decoder layer i: prefill (empty
                                         cache in) and each decode step (one token and the layer's cache in)
      checkpoints/encode_text/<prefix>_head_<j>.{json|pdmodel} + .pdiparams     final norm and block j of lm_head
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
from vlhub.deploy.target import OnBytes, Say
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
                           on_bytes: OnBytes = None, say: Say = None) -> Manifest:
    """Write the conversion's weights for Paddle Inference and export its static graphs into `out`, atomically
    (`say` hears the export's steps)."""
    name = conversion.source.name
    weights = f"{name}-inference"
    # the weights, then the graphs' parameters (as large again); a margin for config and tokenizer files
    with staged_directory(out, conversion.source.local(), overwrite=overwrite, needed=2 * conversion.plan.total_bytes,
                          what="the weights and the static graphs") as staging:
        converted = conversion.write_into(staging / weights, on_bytes=on_bytes, published_as=out / weights)
        from vlhub.targets.paddle_inference.static import export_static

        graphs = export_static(staging / weights, staging, ir=spec.ir, dtype=spec.dtype, max_seq_len=spec.max_seq_len,
                               on_step=say)
        (staging / "README.md").write_text(_readme(name, spec, len(graphs["graphs"]["layers"]),
                                                   len(graphs["graphs"]["head"])))
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


def _readme(name: str, spec: PaddleInferenceSpec, layers: int, heads: int) -> str:
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
        (f"| `checkpoints/encode_text/{prefix}_layer_<i>{suffix}` + `.pdiparams` | static decoder layer i: "
         "`hidden_states` [L, H], `position_ids` and `past_key_values` [2, kv_heads, T, head_dim] in; "
         "`layer_output` [L, H] and `present_key_values` (T + L) out. The prefill passes an empty cache (T = 0), "
         "each decode step one token (L = 1) and the layer's cache so far |"),
        (f"| `checkpoints/encode_text/{prefix}_head_<j>{suffix}` + `.pdiparams` + `config.json` | the final norm and "
         "block j of the output projection: the last layer's `layer_output` in, `logits` [L, entries] of its "
         "vocabulary range out (the manifest gives each block's `vocab` range; config.json "
         "`infer_model_head_blocks` their number) |"),
        ("| `vlhub-manifest.json` | source, options, graph inputs and outputs, every file's sha256, the smoke "
         "verdict |"),
        "",
        "## Run it",
        "",
        ("vlhub's own predictor (Paddle Inference on CPU; the graphs one at a time, checked against the numpy "
         "reference on the source):"),
        "",
        "```bash",
        "vlhub smoke .",
        "```",
        "",
        ("The language model is one graph per decoder layer and a few for the output projection, so that a "
         "predictor holds one part of the model: a process that creates, runs and releases each in turn needs "
         "about one decoder layer's weights and its float32 casts, whatever the model's size. A deployment with "
         "the memory keeps every predictor and chains them for each step: the host embeds the tokens (rows of the "
         "weights' embedding table; the image embeddings at the image positions), each layer's graph takes the "
         "previous one's `layer_output` and its own cache, and the head graphs' logits are joined in order:"),
        "",
        "```python",
        "import numpy as np",
        "from paddle import inference",
        "",
        "def predictor(prefix):  # one graph",
        f"    config = inference.Config(prefix + \"{suffix}\", prefix + \".pdiparams\")",
        "    config.disable_gpu()  # or config.enable_use_gpu(...)",
        "    config.disable_onednn()  # under oneDNN, weights cast from bfloat16 gave NaN logits (paddle 3.3.1)",
        "    return inference.create_predictor(config)",
        "",
        "def run(graph, **inputs):",
        "    for name, value in inputs.items():",
        "        handle = graph.get_input_handle(name)",
        "        handle.reshape(value.shape)",
        "        handle.copy_from_cpu(value)",
        "    graph.run()",
        "    return [graph.get_output_handle(name).copy_to_cpu() for name in graph.get_output_names()]",
        "",
        f"layers = [predictor(f\"checkpoints/encode_text/{prefix}_layer_{{i}}\") for i in range({layers})]",
        f"heads = [predictor(f\"checkpoints/encode_text/{prefix}_head_{{j}}\") for j in range({heads})]",
        "",
        "def step(hidden, position_ids, caches):  # hidden [L, H] float32, position_ids int64, caches: one per layer",
        "    for i, layer in enumerate(layers):",
        "        hidden, caches[i] = run(layer, hidden_states=hidden, position_ids=position_ids,",
        "                                past_key_values=caches[i])",
        "    return np.concatenate([run(head, hidden_states=hidden)[0] for head in heads], axis=1), caches",
        "```",
        "",
        ("The prefill starts from empty caches (`np.zeros([2, kv_heads, 0, head_dim], np.float32)` each); each "
         "decode step passes the chosen token's embedding and its position. A layer graph that also takes "
         "`deepstack_embeds` [L, H] (Qwen3-VL's first layers) is given its DeepStack feature at the image positions, "
         "zeros elsewhere. Graph inputs and outputs (names, shapes, dtypes) are listed under `graphs` in "
         "vlhub-manifest.json."),
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
