"""The Sophgo TPU-MLIR layout: `vlhub convert SRC --to tpu-mlir`.

    DIR/
      model/              the Hugging Face directory `llm_convert` reads: official key names, the full config
                          (vision defaults filled in), safetensors in the dtype --quantize expects, tokenizer,
                          processor, chat-template and generation files
      compile.sh          checks the toolchain, then runs the `llm_convert` command for these options
      vlhub-manifest.json S, max pixels, chip, quantize, layer and head counts, the networks, every file's sha256
      README.md           how to compile and run it

Every option is checked before anything is written: the vision tokens --max-pixels allows plus a prompt must fit
in --seq-length, W and H are multiples of the processor's factor (the config's patch side x merge size: 28 for
Qwen2(.5)-VL, 32 for Qwen3-VL), the group size divides the Linear layers' inputs, the chip is one TPU-MLIR builds
for, and the vision heads are a width llm_convert compiles. What differs by family is the family's
`[targets.tpu-mlir]` facts (`tpu_facts`): the default pixel budget, the vision fields llm_convert reads without
defaults, the merger width's name, the ViT head widths its converter compiles, extra llm_convert flags, LLM-TPU's
demo, a refused --onnx; a sub-table `[targets.tpu-mlir.model_types.<model_type>]` overrides them for one model
type of the family, or refuses it (`refused = "..."`). A family without the table has no route here. Sources:
TPU-MLIR python/tools/llm_convert.py and python/llm/ (llm_convert, read from the tpu-mlir 1.30.2 wheel), LLM-TPU
models/Qwen2_VL, models/Qwen2_5_VL and models/Qwen3_VL python_demo (the runtime).
"""

from __future__ import annotations

import math
import shlex
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vlhub import __version__
from vlhub.atomic import staged_directory
from vlhub.convert.configs import official_config
from vlhub.convert.conversion import Conversion
from vlhub.deploy.target import OnBytes
from vlhub.errors import Note, UserError
from vlhub.family_registry import Family, family_of_config
from vlhub.manifest import MANIFEST, FileEntry, Manifest, TargetRecord
from vlhub.sizes import parse_size_pair
from vlhub.smoke.inputs import SMOKE_IMAGE, SMOKE_PATCHES
from vlhub.targets.tpu_mlir import NAME

# --quantize -> the dtype llm_convert requires the checkpoint to declare (its "mismatch with model dtype" check)
QUANTIZE_DTYPE = {"w4bf16": "bfloat16", "w8bf16": "bfloat16", "bf16": "bfloat16",
                  "w4f16": "float16", "w8f16": "float16", "f16": "float16"}
CHIPS = ("bm1684x", "bm1688")
DEFAULT_SEQ_LENGTH = 2048
DEFAULT_GROUP_SIZE = 64
# where the toolchain's setup is written down, as a user with the source or the installed package finds it
TOOLCHAIN_DOC = "docs/targets/tpu-mlir.md in vlhub's source, section 'The TPU-MLIR toolchain'"
# the toolchain as that section sets it up: torch pinned and first, since an unpinned install on Python 3.10
# pulls PyPI's CUDA build and its libraries; the wheel imports psutil and flatbuffers without declaring them
TORCH_FIRST = (f"torch==2.13.0 first (on Python 3.10 PyPI has only its CUDA build, several GB: {TOOLCHAIN_DOC}, "
               "installs it with --no-deps and CPU stubs)")
TOOLCHAIN_INSTALL = "pip install tpu-mlir==1.30.2 psutil flatbuffers"
# room beside the image in the sequence: the chat template's system and user turns, a question, an answer
PROMPT_TOKENS = 64


@dataclass(frozen=True)
class TpuOptions:
    """The compile options, checked against the model's config by `check_tpu_options`. `patch` and `merge` are
    the model's (vision_config patch_size, spatial_merge_size; `tpu_options` reads them): the defaults are
    Qwen2(.5)-VL's, for options built by hand."""

    seq_length: int
    max_pixels: tuple[int, int]  # W, H
    quantize: str
    group_size: int
    chip: str
    patch: int = 14
    merge: int = 2

    @property
    def vision_patches(self) -> int:
        """ViT input rows, as llm_convert sizes its ViT (max_pixels // patch**2): the patches of a W x H image,
        which the processor keeps as it is, W and H being multiples of patch x merge (each row 3 x 2 x patch**2
        values)."""
        width, height = self.max_pixels
        return (height // self.patch) * (width // self.patch)

    @property
    def vision_tokens(self) -> int:
        """Tokens the largest image becomes in the sequence, after the merge."""
        return self.vision_patches // self.merge ** 2

    @property
    def factor(self) -> int:
        """The processor's resize multiple: one merged token's side in pixels."""
        return self.patch * self.merge


@dataclass(frozen=True)
class TpuSpec:
    """The layout's options settled against the model: the compile options, the ONNX flow, the weights' cast."""

    family: Family
    options: TpuOptions
    onnx: bool
    dtype: str | None  # what the weights are cast to: the one --quantize needs, when the source is not in it
    allow_unmatched: bool = False
    facts: dict | None = field(default=None, compare=False)  # `tpu_facts` for the model (None: work them out)

    def cache_key(self) -> dict[str, object]:
        options = self.options
        return {"chip": options.chip, "quantize": options.quantize, "seq": options.seq_length, "onnx": self.onnx,
                "pixels": "x".join(map(str, options.max_pixels)),
                "group": options.group_size if options.quantize.startswith("w") else None}


# the config.json fields that are the inputs of the Linear weights llm_convert quantizes, unless a family says
QUANTIZED_INPUTS = ("hidden_size", "intermediate_size")


def tpu_facts(family: Family, config: dict | None = None) -> dict:
    """The family's `[targets.tpu-mlir]` facts for a config's model type: the table, with the model type's own
    `model_types.<model_type>` sub-table over it. UserError with the reason when the family has no route, or the
    sub-table refuses the model type (`refused`)."""
    model_type = (config or {}).get("model_type")
    facts = family.route(NAME, model_type)  # the family's or the model type's refusal stops here
    own = (facts.get("model_types") or {}).get(model_type, {})
    return {**{key: value for key, value in facts.items() if key != "model_types"}, **own}


def vision_fields(config: dict, facts: dict) -> dict:
    """The vision config as llm_convert reads it: the config's fields, the family's defaults where it has none."""
    return {**facts.get("vision_defaults", {}), **(config.get("vision_config") or {})}


def parse_max_pixels(text: str | None, facts: dict) -> tuple[int, int]:
    """(width, height) of `--max-pixels WxH` (llm_convert's own W,H read too, with a note; default: llm_convert's
    own for the family)."""
    if text is None:
        width, height = facts["max_pixels"]
        return width, height
    return parse_size_pair(text, "--max-pixels", comma_spelling="llm_convert")


def tpu_options(family: Family, config: dict, source_dtype: str, *, seq_length: int = DEFAULT_SEQ_LENGTH,
                max_pixels: str | None = None, quantize: str | None = None, group_size: int = DEFAULT_GROUP_SIZE,
                chip: str = "bm1684x") -> TpuOptions:
    """The options as given (defaults: llm_convert's pixel budget for the family, 4-bit weights with the half
    type the checkpoint has), checked against the model's flat config; UserError for a family or model type
    with no route."""
    facts = tpu_facts(family, config)
    vision = vision_fields(config, facts)
    default = "w4f16" if source_dtype == "float16" else "w4bf16"
    options = TpuOptions(seq_length, parse_max_pixels(max_pixels, facts), quantize or default, group_size, chip,
                         int(vision["patch_size"]), int(vision["spatial_merge_size"]))
    check_tpu_options(config, options)
    return options


def check_tpu_options(config: dict, options: TpuOptions) -> None:
    """Refuse, with the valid range and why, options llm_convert or the runtime cannot take (and a model it
    cannot compile). `config` is the flat official form; its family's facts say what its converter compiles."""
    family = family_of_config(config)
    facts = tpu_facts(family, config) if family is not None else {}
    _check_vit_heads(vision_fields(config, facts), facts.get("vit_head_dim") or {})
    for first, second, why in facts.get("equal_fields", []):  # widths the family's converter needs equal
        if config.get(first) != config.get(second):
            raise UserError(f"config.json {first} {config.get(first)} and {second} {config.get(second)}: TPU-MLIR's "
                            f"llm_convert compiles only models where they are equal ({why})")
    if options.chip not in CHIPS:
        raise UserError(f"--chip {options.chip!r}: choose {' or '.join(CHIPS)}")
    if options.quantize not in QUANTIZE_DTYPE:
        raise UserError(f"--quantize {options.quantize!r}: choose one of {', '.join(QUANTIZE_DTYPE)} "
                        "(w4/w8: 4- or 8-bit weights with bf16 or f16 activations)")
    width, height = options.max_pixels
    factor = options.factor
    if width % factor or height % factor or min(width, height) < 2 * factor:
        raise UserError(f"--max-pixels {width}x{height}: W and H must be multiples of {factor} ({options.patch}-pixel "
                        f"patches merged {options.merge}x{options.merge}), at least {2 * factor}; e.g. "
                        f"{_nearest(width, factor)}x{_nearest(height, factor)}")
    needed = options.vision_tokens + PROMPT_TOKENS
    limit = int(config.get("max_position_embeddings") or 32768)
    if not needed <= options.seq_length <= limit:
        raise UserError(f"--seq-length {options.seq_length}: a {width}x{height} image is {options.vision_tokens} "
                        f"vision tokens, so the sequence needs at least {needed} (with {PROMPT_TOKENS} for the "
                        f"prompt and answer), and at most {limit} (max_position_embeddings)")
    if options.quantize.startswith("w"):
        # the widths the quantized Linear weights take in, as the family lists them (those its config has)
        inputs = {key: config[key] for key in facts.get("quantized_inputs", QUANTIZED_INPUTS) if key in config}
        if options.group_size < 1 or any(size % options.group_size for size in inputs.values()):
            raise UserError(f"--group-size {options.group_size}: it must divide every quantized Linear's input "
                            f"({', '.join(f'{k} {v}' for k, v in inputs.items())}); 64 or 128 usually do")


def _check_vit_heads(vision: dict, rule: dict) -> None:
    """The vision heads' width against what the family's llm_convert converter compiles (`vit_head_dim`: a width
    it `equals`, or a `multiple_of`)."""
    if not rule:
        return
    key = "embed_dim" if "embed_dim" in vision else "hidden_size"
    width, heads = vision.get(key), vision.get("num_heads")
    if not isinstance(width, int) or not isinstance(heads, int) or heads < 1:
        raise UserError(f"vision_config {key} {width!r} / num_heads {heads!r}: llm_convert needs both as positive "
                        "integers")
    head_dim = width // heads
    if "equals" in rule and head_dim != rule["equals"]:
        allowed = f"{rule['equals']}"
    elif "multiple_of" in rule and head_dim % rule["multiple_of"]:
        allowed = f"multiples of {rule['multiple_of']}"
    else:
        return
    raise UserError(f"this model's vision heads are {head_dim} wide; TPU-MLIR's llm_convert compiles only {allowed} "
                    f"({rule['why']}; vision_config {key} {width} / num_heads {heads})")


def _nearest(pixels: int, factor: int) -> int:
    return max(2 * factor, round(pixels / factor) * factor)


def build_tpu_mlir(conversion: Conversion, spec: TpuSpec, out: Path, *, overwrite: bool = False,
                   on_bytes: OnBytes = None) -> Manifest:
    """Write the TPU-MLIR layout of the conversion into `out`, atomically. With `spec.onnx`, also the older flow's
    ONNX networks, exported one network at a time from model/, and compile_onnx.sh."""
    options = spec.options
    facts = spec.facts if spec.facts is not None else tpu_facts(spec.family, official_config(conversion.config))
    _check_layer_kinds(conversion, facts)
    _check_rotary_sections(conversion, facts)
    for note in conversion.plan.keymap.drop_notes(conversion.plan.dropped):
        warnings.warn(note, Note, stacklevel=1)
    with staged_directory(out, conversion.source.local(), overwrite=overwrite, needed=conversion.plan.total_bytes,
                          what="the model directory") as staging:
        weights = conversion.write_into(staging / "model", on_bytes=on_bytes,
                                        edit_config=lambda config: fill_vision_defaults(config, facts))
        scripts = {"compile.sh": compile_script(options, facts)}
        exported = None
        if spec.onnx:
            exported = _export_onnx(staging, options, on_bytes)
            scripts["compile_onnx.sh"] = onnx_compile_script(options, exported["networks"],
                                                             _bmodel_name(conversion, options))
        for name, text in scripts.items():
            (staging / name).write_text(text)
            (staging / name).chmod(0o755)
        (staging / "README.md").write_text(_readme(conversion, spec.family, options, facts, onnx=spec.onnx))
        manifest = _manifest(conversion, staging, spec, facts, weights, exported)
        manifest.write(staging)
    return manifest


def _check_layer_kinds(conversion: Conversion, facts: dict) -> None:
    """A hybrid model's full-attention layers where the family's runtime runs them (`full_attention_every`: layer i
    exactly when (i + 1) % every == 0), read from the config as written (the flat one has no layer_types)."""
    every = facts.get("full_attention_every")
    if every is None:
        return
    dims = conversion.plan.keymap.resolve_dims(conversion.config)
    full = dims["full_layers"]
    if full != tuple(i for i in range(int(dims["layers"])) if (i + 1) % every == 0):  # type: ignore[call-overload]
        raise UserError(f"config.json layer_types puts full attention at layers {list(full)}; LLM-TPU's runtime "
                        f"({facts['demo']}) runs layer i as full attention exactly when (i + 1) % {every} == 0, as "
                        "every release has it, so it would run this model's layers as the wrong kind; no --to "
                        "tpu-mlir for it")


def _check_rotary_sections(conversion: Conversion, facts: dict) -> None:
    """The multimodal rotary's sections against the head dims transformers rotates (`sections_cover`: the key map's
    dim naming them): llm_convert's converter rotates 2 * sum(mrope_section) dims of each head."""
    cover = facts.get("sections_cover")
    if cover is None:
        return
    dims = conversion.plan.keymap.resolve_dims(conversion.config)
    sections, rotated = list(dims["mrope_section"]), int(dims[cover])  # type: ignore[call-overload]
    if 2 * sum(sections) != rotated:
        raise UserError(f"config.json mrope_section {sections} does not cover the rotated {rotated} of head_dim "
                        f"{dims['head_dim']}: TPU-MLIR's llm_convert rotates 2 * sum(mrope_section) = "
                        f"{2 * sum(sections)} dims of each head, transformers {rotated}, so the compiled model would "
                        "answer differently; no --to tpu-mlir for it")


def check_smoke_image_fits(options: TpuOptions) -> None:
    """The ONNX smoke test feeds the exported ViT the smoke image: the pixel budget must hold it."""
    if options.vision_patches < SMOKE_PATCHES:
        height, width = SMOKE_IMAGE
        raise UserError(f"--max-pixels {options.max_pixels[0]}x{options.max_pixels[1]} exports a ViT for "
                        f"{options.vision_patches} patches, fewer than the smoke test's {width}x{height} image "
                        f"({SMOKE_PATCHES}); give at least {width}x{height}, or pass --no-smoke")


def check_onnx_installed() -> None:
    """Refuse --onnx before anything is written when onnx or onnxruntime cannot be imported."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise UserError(f"--onnx exports and runs ONNX networks with onnx and onnxruntime, which are not importable "
                        f"({exc}); install them with: pip install 'vlhub[onnx]'") from None


def _export_onnx(staging: Path, options: TpuOptions, on_bytes: Callable[[int], None] | None) -> dict:
    from vlhub.smoke.weights import ModelWeights
    from vlhub.targets.tpu_mlir.onnx_export import export_onnx

    with ModelWeights.open(staging / "model") as weights:  # streamed: one tensor in memory at a time
        return export_onnx(weights, staging, seq_length=options.seq_length, vision_patches=options.vision_patches,
                           on_bytes=on_bytes)


def _bmodel_name(conversion: Conversion, options: TpuOptions) -> str:
    """sophon-demo's naming: <model>_<quantize>_seq<S>_<chip>_1dev.bmodel."""
    name = conversion.source.model.name if conversion.source.model else Path(conversion.source.given).name
    return f"{name.lower()}_{options.quantize}_seq{options.seq_length}_{options.chip}_1dev.bmodel"


def fill_vision_defaults(config: dict, facts: dict) -> None:
    """llm_convert reads the vision config's fields without transformers' defaults: write them into `config` (the
    family's `vision_defaults`), and the merger's output width under the name the family's llm_convert reads.
    `config` is the config.json being written, flat or nested (`text_config`) as the family's official file is."""
    vision = config.setdefault("vision_config", {})
    for key, value in facts["vision_defaults"].items():
        vision.setdefault(key, value)
    if "in_chans" in vision:
        vision["in_channels"] = vision["in_chans"]
    vision.setdefault(facts["merger_width"], official_config(config)["hidden_size"])


def networks(layers: int, facts: dict | None = None) -> list[str]:
    """The networks llm_convert combines into one bmodel (the runtime looks them up by these names): a family's
    converter may add its own (`extra_networks`: Qwen3-VL's `add`, which adds the DeepStack features)."""
    return ["vit", *(facts or {}).get("extra_networks", []), "embedding", "embedding_cache", "lm_head",
            *(f"{kind}_{i}" for i in range(layers) for kind in ("block", "block_cache"))]


def llm_convert_command(options: TpuOptions, facts: dict | None = None) -> list[str]:
    """The llm_convert arguments for these options, run in DIR (model/ in, compiled/ out), with the family's own
    flags (`llm_convert_flags`)."""
    command = ["-m", "./model", "-s", str(options.seq_length), "-q", options.quantize]
    if options.quantize.startswith("w"):
        command += ["-g", str(options.group_size)]
    # llm_convert's --max_pixels is "width,height" (parse_max_pixels in its llm_convert.py)
    return command + ["-c", options.chip, "--max_pixels", "{},{}".format(*options.max_pixels),
                      *(facts or {}).get("llm_convert_flags", []), "-o", "./compiled"]


def compile_script(options: TpuOptions, facts: dict | None = None) -> str:
    """compile.sh: the toolchain checks, each failing with what to do, then the llm_convert command."""
    arguments = " ".join(shlex.quote(a) for a in llm_convert_command(options, facts))
    forced = (facts or {}).get("dynamic_forced")
    dynamic = f"# Dynamic networks whatever the flags: {forced}.\n" if forced else ""
    return f"""#!/usr/bin/env bash
# Compile ./model for {options.chip} with TPU-MLIR's llm_convert (written by vlhub {__version__}).
# The bmodel lands in ./compiled/, with ./compiled/config/ (tokenizer and processor files) beside it.
{dynamic}{_toolchain_checks(parallel=True)}PATH="$BIN:$PATH" "$PYTHON" "$LLM_CONVERT" {arguments}
"""


# how each kind of network is deployed in the ONNX flow, as LLM-TPU's models/Qwen2_VL/compile/compile.sh did
_DEPLOY_FLAGS = {
    "embedding": ["--quant_input", "--quant_output"],
    "lm_head": ["--quant_input"],
    "block": ["--quant_input", "--quant_output"],
    "block_cache": ["--quant_input", "--quant_output", "--addr_mode", "io_alone"],
    "head": [],  # greedy / penalty-sample heads stay float32
    # float32 in: LLM-TPU's runtime (models/Qwen2_VL/python_demo/chat.cpp, forward_vit) copies float32 pixels
    # and masks into `vit`, and llm_convert compiles it without --quant_input (TPU-MLIR
    # python/llm/LlmConverter.py, compile_vit)
    "vit": ["--quant_output", "--high_precision"],
}


def onnx_compile_script(options: TpuOptions, networks: dict, bmodel: str) -> str:
    """compile_onnx.sh: model_transform and model_deploy per ONNX file (input shapes from the exported graphs),
    then model_tool --combine into `bmodel`, as sophon-demo's and LLM-TPU's compile scripts do."""
    weights = ["--quantize", options.quantize.upper()]
    if options.quantize.startswith("w"):
        weights += ["--q_group_size", str(options.group_size)]
    half = ["--quantize", "BF16" if QUANTIZE_DTYPE[options.quantize] == "bfloat16" else "F16"]
    lines = []
    for name, network in networks.items():
        kind = _network_kind(name)
        quantize = ["--quantize", "F32"] if kind == "head" else half if kind == "vit" else weights
        shapes = "[" + ",".join("[" + ",".join(map(str, shape)) + "]" for _, shape, _ in network["inputs"]) + "]"
        flags = " ".join(shlex.quote(a) for a in [*quantize, *_DEPLOY_FLAGS[kind]])
        lines.append(f"net {name} {shlex.quote(network['file'])} {shlex.quote(shapes)} {flags}")
    return f"""#!/usr/bin/env bash
# Compile ./models/onnx for {options.chip}, one network at a time, with TPU-MLIR's model_transform and
# model_deploy, then combine them (written by vlhub {__version__}). The bmodel lands in ./compiled_onnx/.
{_toolchain_checks(parallel=False)}export PATH="$BIN:$PATH"
net() {{  # name, ONNX file, input shapes, model_deploy flags
    local name=$1 file=$2 shapes=$3
    shift 3
    mkdir -p "compiled_onnx/$name"
    (cd "compiled_onnx/$name" &&
        model_transform.py --model_name "$name" --model_def "../../$file" --input_shapes "$shapes" \\
            --mlir "$name.mlir" &&
        model_deploy.py --mlir "$name.mlir" --chip {options.chip} --model "$name.bmodel" "$@")
}}
{chr(10).join(lines)}
model_tool --combine {" ".join(f"compiled_onnx/{name}/{name}.bmodel" for name in networks)} \\
    -o compiled_onnx/{shlex.quote(bmodel)}
"""


def _network_kind(name: str) -> str:
    """The _DEPLOY_FLAGS entry of a network: block_3 -> block, block_cache_3 -> block_cache."""
    if name in ("greedy_head", "penalty_sample_head"):
        return "head"
    if name.startswith("embedding"):
        return "embedding"
    return name if name == "lm_head" else name.rsplit("_", 1)[0]


def _toolchain_checks(*, parallel: bool) -> str:
    """The shell lines that stop a compile script early, with what to do, when the toolchain is not there."""
    if parallel:
        flow_check = ('\ncommand -v parallel >/dev/null || fail "GNU parallel is not on PATH (llm_convert runs '
                      'its jobs with it): apt-get install parallel"')
    else:
        flow_check = ("\n\"$PYTHON\" -c 'import onnx, onnxruntime' 2>/dev/null \\\n    || fail \"model_transform reads "
                      "ONNX with onnx and onnxruntime: $PYTHON -m pip install 'tpu-mlir[onnx]==1.30.2'\"")
    return f"""# TPU-MLIR is a Python 3.10 wheel: set VLHUB_TPU_MLIR_PYTHON to the python3.10 it is installed for
# (README.md says how to set it up).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${{VLHUB_TPU_MLIR_PYTHON:-python3.10}}"
fail() {{ echo "error: $*" >&2; exit 2; }}
command -v "$PYTHON" >/dev/null || fail "$PYTHON not found: install Python 3.10 and set VLHUB_TPU_MLIR_PYTHON to it"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))' \\
    || fail "$PYTHON is not Python 3.10, the only version the tpu-mlir wheel installs on"
TORCH="install {TORCH_FIRST}"
"$PYTHON" -c 'import tpu_mlir' 2>/dev/null \\
    || fail "tpu-mlir is not importable by $PYTHON: $TORCH, then $PYTHON -m {TOOLCHAIN_INSTALL}"
"$PYTHON" -c 'import torch, psutil' 2>/dev/null \\
    || fail "TPU-MLIR also needs torch and psutil: $TORCH, then $PYTHON -m pip install psutil"{flow_check}
BIN="$(dirname "$(command -v "$PYTHON")")"
LLM_CONVERT="$BIN/llm_convert.py"
[ -x "$LLM_CONVERT" ] || LLM_CONVERT="$(command -v llm_convert.py)" || fail "llm_convert.py not found beside $PYTHON"
"""


def _manifest(conversion: Conversion, staging: Path, spec: TpuSpec, facts: dict, weights: Manifest,
              exported: dict | None) -> Manifest:
    files = {f"model/{name}": entry for name, entry in weights.files.items()}
    scripts = ["compile.sh", "compile_onnx.sh"] if exported else ["compile.sh"]
    for name in (f"model/{MANIFEST}", *scripts, "README.md"):
        files[name] = FileEntry.of(staging / name)
    if exported:
        files.update({name: FileEntry(**entry) for name, entry in exported["files"].items()})
    config = official_config(conversion.config)
    options = spec.options
    quantized = options.quantize.startswith("w")
    details = {
        "chip": options.chip, "quantize": options.quantize, "group_size": options.group_size if quantized else None,
        "seq_length": options.seq_length, "max_pixels": list(options.max_pixels),
        "vision_patches": options.vision_patches, "vision_tokens": options.vision_tokens,
        "layers": config["num_hidden_layers"], "hidden_size": config["hidden_size"],
        "attention_heads": config["num_attention_heads"], "kv_heads": config["num_key_value_heads"],
        "vision_depth": config["vision_config"]["depth"],
        "networks": networks(config["num_hidden_layers"], facts),
        # llm_convert --dynamic: the ViT and the prefill blocks take the real rows and mask them themselves
        "dynamic": "--dynamic" in facts.get("llm_convert_flags", []),
        "llm_convert": ["llm_convert.py", *llm_convert_command(options, facts)],
        "onnx": {"networks": exported["networks"], "bmodel": f"compiled_onnx/{_bmodel_name(conversion, options)}"}
        if exported else None,
    }
    dropped = conversion.plan.keymap.drop_notes(conversion.plan.dropped)
    if dropped:  # what model/ leaves out of the checkpoint, and why (also said on stderr)
        details["dropped"] = dropped
    target = TargetRecord(name=NAME, family=spec.family.name, weights="model", smoke_path="model",
                          dtype=QUANTIZE_DTYPE[options.quantize], details=details)
    return Manifest(weights.source, target, files)


def _onnx_readme(conversion: Conversion, options: TpuOptions) -> list[str]:
    return [
        "## The ONNX flow (sophon-demo)",
        "",
        ("`models/onnx/llm/` holds `block_N.onnx` and `block_cache_N.onnx` (KV sequence-major [1, S, kv_heads, "
         "head_dim]; the decode block returns the new token's K/V only), `embedding.onnx`, `embedding_cache.onnx`, "
         "`lm_head.onnx`, `greedy_head.onnx` and `penalty_sample_head.onnx`; `models/onnx/vit/` the vision "
         "transformer. Inputs and outputs are listed under `target.onnx.networks` in vlhub-manifest.json. "
         "`compile_onnx.sh` runs `model_transform.py` and `model_deploy.py` for each, then `model_tool --combine`:"),
        "",
        ("- The vision transformer's network is named `vit` (its file keeps LLM-TPU's name, "
         "`vision_transformer.onnx`): LLM-TPU's runtime looks it up by that name "
         "(`sophgo/LLM-TPU` `models/Qwen2_VL/python_demo/chat.cpp`, `bmrt_get_network_info(p_bmrt, \"vit\")`), as "
         "its old `models/Qwen2_VL/compile/compile.sh` named it."),
        ("- It is compiled with float32 inputs (`--quant_output --high_precision`, no `--quant_input`): that "
         "runtime's `forward_vit` copies float32 pixels and masks in, and TPU-MLIR's llm_convert compiles its `vit` "
         "the same way (`python/llm/LlmConverter.py`, `compile_vit`). The old compile.sh's `--quant_input "
         "--quant_input_list 3` (the mask in half precision) went with an older chat.cpp that built the mask in "
         "half precision itself."),
        ("- Qwen2.5-VL's ViT takes llm_convert's input names, `full_attn_mask`, `window_attn_mask` and "
         "`reverse_index` (TPU-MLIR `python/llm/Qwen2_5VLConverter.py`); Qwen2-VL's keeps the old export's "
         "`attention_mask` [1, P, P]."),
        "",
        "```bash",
        "VLHUB_TPU_MLIR_PYTHON=/path/to/python3.10 ./compile_onnx.sh",
        f"# writes compiled_onnx/{_bmodel_name(conversion, options)}",
        "```",
        "",
    ]


def _position_grid_note(config: dict, facts: dict) -> list[str]:
    """What the demo needs changed when the model's learned position table is not the grid its pipeline.py
    resamples (`demo_position_grid`), else nothing."""
    grid = facts.get("demo_position_grid")
    table = (config.get("vision_config") or {}).get("num_position_embeddings")
    if grid is None or table is None or table == grid * grid:
        return []
    side = math.isqrt(table)
    fix = (f"is {side}x{side} (num_position_embeddings {table}): set `num_grid_per_side = {side}` there before "
           "running it" if side * side == table else
           f"has {table} rows (num_position_embeddings), not a square grid the demo can resample")
    return ["", (f"LLM-TPU's `pipeline.py` resamples the ViT's learned position table as a {grid}x{grid} grid "
                 f"(`num_grid_per_side = {grid}`, as in every released model); this model's {fix}.")]


def _readme(conversion: Conversion, family: Family, options: TpuOptions, facts: dict, *, onnx: bool) -> str:
    width, height = options.max_pixels
    name = conversion.source.model.name if conversion.source.model else Path(conversion.source.given).name
    command = " ".join(["llm_convert.py", *(shlex.quote(a) for a in llm_convert_command(options, facts))])
    named = ", ".join(f"`{network}`" for network in networks(0, facts))  # besides the blocks
    return "\n".join([
        f"# {name} for Sophgo {options.chip.upper()} (TPU-MLIR)",
        "",
        (f"Written by vlhub {__version__}: `{options.quantize}` weights, sequence length {options.seq_length}, "
         f"images resized up to {width}x{height} (width x height; {options.vision_patches} patches, "
         f"{options.vision_tokens} vision "
         "tokens)."),
        "",
        "| path | what it is |",
        "|---|---|",
        (f"| `model/` | the Hugging Face directory llm_convert reads ({family.name}: official key names, full config, "
         f"{QUANTIZE_DTYPE[options.quantize]} safetensors, tokenizer and processor files) |"),
        "| `compile.sh` | checks the toolchain, then compiles `model/` into `compiled/` |",
        "| `vlhub-manifest.json` | the options, layer and head counts, the networks, every file's sha256 |",
        "",
        "## Compile",
        "",
        ("Needs Python 3.10 with `torch==2.13.0` (installed first: on Python 3.10 PyPI has only its CUDA build), "
         f"`tpu-mlir==1.30.2`, `psutil` and `flatbuffers`, and GNU `parallel`; {TOOLCHAIN_DOC} sets this up step "
         "by step, on a machine that is not Ubuntu 22.04 too."),
        "",
        "```bash",
        "VLHUB_TPU_MLIR_PYTHON=/path/to/python3.10 ./compile.sh",
        f"# runs: {command}",
        "```",
        "",
        (f"It writes `compiled/<stem>_<timestamp>.bmodel` (networks {named}, `block_N`, `block_cache_N`) and "
         "`compiled/config/`."),
        "",
        *(_onnx_readme(conversion, options) if onnx else []),
        "## Run",
        "",
        f"On the device, with LLM-TPU's demo (`{facts['demo']}`):",
        "",
        "```bash",
        "python3 pipeline.py -m compiled/<stem>_<timestamp>.bmodel -c compiled/config",
        "```",
        "",
        ("The demo reads the image budget from the bmodel's vision network: give it images resized up to "
         f"{width}x{height} (width x height; larger ones are resized down); prompts and answers share the "
         f"{options.seq_length} positions with the {options.vision_tokens} vision tokens."),
        *_position_grid_note(conversion.config, facts),
        "",
    ])
