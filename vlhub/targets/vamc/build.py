"""`vlhub convert SRC --to vamc`: the VastAI VACC layout of a Qwen2-VL / Qwen2.5-VL checkpoint, every number
computed (`vlhub.plan`) and checked. Sources: VastModelZOO vlm/qwen2_vl and vlm/qwen2_5_vl (README.md,
build_in/build/*.yaml, build_in/source_code/), llm/README.md.

    DIR/weights/<name>/                 the HF folder both yamls' frontend.checkpoint name: official key names,
                                        config.json, config_vacc.json (auto_map, eager attention, insert_slice),
                                        tokenizer and processor files; the vendor's *_vacc.py files go here
    DIR/build_in/build/<family>_llm.yaml, <family>_visual.yaml   the two `vamc compile` inputs
    DIR/embed_tokens.bin, embed_tokens.json     the float16 [vocab, hidden] table the host embeds with
    DIR/preprocess_config.json          min/max pixels for vastgenx, consistent with the visual N
    DIR/tokenizer/                      when the source has tokenizer files
    DIR/compile.sh, README.md, vlhub-manifest.json

The visual network takes N patch rows (a multiple of 16 and of the 2x2 merge unit): the largest image the
pixel budget allows, padded. The LLM takes a prefill of P tokens (the image's N/4 plus a prompt) and a
context of M, both multiples of 16 (`vlhub.plan.vamc_lengths`, which `vlhub plan` sizes them with too);
tp splits the KV heads across dies, so it divides them.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from vlhub import __version__, families
from vlhub.atomic import staged_directory
from vlhub.convert.configs import official_config
from vlhub.convert.conversion import MANIFEST, Conversion, prepare_conversion
from vlhub.embeddings import prepare_dump
from vlhub.errors import UserError
from vlhub.formats.writers import file_entry, write_json_atomic
from vlhub.hub.store import conversion_output
from vlhub.plan import (
    MAX_VAMC_PATCHES,
    OUTPUT_CHUNK,
    max_pixels_for,
    parse_size_pair,
    patch_multiple,
    plan_inputs,
    refuse_target,
    round_up,
    vamc_lengths,
    visual_output_split,
)
from vlhub.smoke.inputs import MIN_PIXELS, SMOKE_IMAGE, SMOKE_PATCHES, VisionGeometry
from vlhub.targets.base import DeployedLayout, Deployment
from vlhub.units import now_iso

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
DEFAULT_MAX_PIXELS = 14 * 14 * 4 * 1280  # the VastModelZOO README's default: 5120 patches, 1280 tokens
PREFERRED_TP = 4  # VastModelZOO's builds: one die per shard, four dies
# the vacc recipe's pinned environment (the recipes' yamls' workspace.pyenv)
PYENV = {"qwen2_vl": {"transformers": "4.45.0", "huggingface-hub": "0.23.2"},
         "qwen2_5_vl": {"transformers": "4.51.3", "huggingface-hub": "0.30.2"}}
# what the weight folder needs from VastModelZOO (not ours to ship): the recipe folder's Python files, and what
# config_vacc.json's auto_map names, as the vendor's own config_vacc.json spells it. Qwen2-VL's auto_map names a
# processing_qwen2_vl.py that vlm/qwen2_vl/build_in/source_code/ does not hold (only config_vacc.json,
# configuration_qwen2_vl.py, export_onnx.py, modeling_qwen2_vl_vacc.py): compiling loads the config and model
# classes, and the modeling file imports configuration_qwen2_vl, so those two are what the recipe uses
VENDOR = {
    "qwen2_vl": {"directory": "vlm/qwen2_vl/build_in/source_code",
                 "files": ("modeling_qwen2_vl_vacc.py", "configuration_qwen2_vl.py"),
                 "auto_map": {"AutoConfig": "configuration_qwen2_vl.Qwen2VLConfig",
                              "AutoModel": "modeling_qwen2_vl_vacc.Qwen2VLForConditionalGeneration",
                              "AutoProcessor": "processing_qwen2_vl.Qwen2VLProcessor"}},
    "qwen2_5_vl": {"directory": "vlm/qwen2_5_vl/build_in/source_code",
                   "files": ("modeling_qwen2_5_vl_vacc.py", "configuration_qwen2_5_vl_vacc.py",
                             "processing_qwen2_5_vl_vacc.py"),
                   "auto_map": {"AutoConfig": "configuration_qwen2_5_vl_vacc.Qwen2_5_VLConfig",
                                "AutoModel": "modeling_qwen2_5_vl_vacc.Qwen2_5_VLForConditionalGeneration",
                                "AutoProcessor": "processing_qwen2_5_vl_vacc.Qwen2_5_VLProcessor"}},
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja")


@dataclass(frozen=True)
class VamcOptions:
    """The compile numbers, checked against the model's config by `vamc_options`."""

    visual_patches: int  # N
    min_pixels: int
    max_pixels: int  # the largest image N holds: what preprocess_config.json tells vastgenx
    prefill_length: int
    max_length: int
    tp: int
    images: tuple[tuple[int, int], ...] = ()  # the --image sizes (W, H) the budget was planned for

    @property
    def visual_tokens(self) -> int:
        return self.visual_patches // 4


def vamc_options(family: str, config: dict, *, image: list[str] | None = None, max_pixels: str | None = None,
                 prefill_len: int | None = None, max_len: int | None = None, tp: int | None = None,
                 dtype: str | None = None) -> VamcOptions:
    """The options as given, defaults computed from the model's flat config and the image budget (the
    `--image` sizes as `vlhub plan` counts them, else `--max-pixels`, else VastModelZOO's 1,003,520), refused
    with the valid range."""
    refuse_target(family, "vamc")
    if dtype not in (None, "float16"):
        raise UserError(f"--dtype {dtype}: the vamc recipes compile float16 (backend dtype fp16); int8 builds need "
                        "a GPTQ checkpoint, which vlhub does not make")
    if image and max_pixels:
        raise UserError("give the image budget as --image WxH (the sizes you will send) or as --max-pixels N, "
                        "not both")
    min_pixels = MIN_PIXELS
    sizes = tuple(parse_size_pair(text, "--image") for text in image or ())
    if sizes:  # at the processor's own bounds, as `vlhub plan` resizes them: the N it prints is the N built
        needed = max(item.patches for item in plan_inputs(config, images=list(sizes)))
        why = f"the largest --image ({needed} patches)"
    else:
        budget = _pixel_count(max_pixels) if max_pixels else DEFAULT_MAX_PIXELS
        if budget < min_pixels:
            raise UserError(f"--max-pixels {budget}: below the processor's min_pixels {min_pixels}")
        needed = max_pixels_patches(config, budget)
        why = f"--max-pixels {budget} ({needed} patches)"
    patches = round_up(needed, patch_multiple(config))
    if patches > MAX_VAMC_PATCHES:
        raise UserError(f"{why} needs a visual N of {patches}; vlhub builds N up to {MAX_VAMC_PATCHES} (its "
                        f"attention_mask is [1, N, N]; the published builds use 4096 to 6144): lower the budget to "
                        f"--max-pixels {max_pixels_for(config, MAX_VAMC_PATCHES)} or less")
    options = _llm_options(config, patches, prefill_len, max_len, tp)
    return VamcOptions(patches, min_pixels, max_pixels_for(config, patches), *options, images=sizes)


def max_pixels_patches(config: dict, max_pixels: int) -> int:
    """The most patches an image resized within `max_pixels` can have: sides are multiples of 28 (14-pixel
    patches merged 2x2), so whole 28x28 squares of four patches each."""
    geometry = VisionGeometry.from_config(config)
    return max_pixels // (geometry.patch * geometry.merge) ** 2 * geometry.merge ** 2


def _llm_options(config: dict, patches: int, prefill_len: int | None, max_len: int | None,
                 tp: int | None) -> tuple[int, int, int]:
    prefill, longest = vamc_lengths(config, patches, prefill=prefill_len, longest=max_len)
    kv_heads = int(config["num_key_value_heads"])
    chosen = tp if tp is not None else math.gcd(PREFERRED_TP, kv_heads)
    if chosen < 1 or kv_heads % chosen:
        valid = ", ".join(str(n) for n in range(1, kv_heads + 1) if kv_heads % n == 0)
        raise UserError(f"--tp {chosen}: tensor parallelism splits the model's {kv_heads} KV heads across dies, so "
                        f"it must divide {kv_heads}: choose {valid}")
    return prefill, longest, chosen


def build_vamc(
    source: str,
    out: Path | None = None,
    *,
    image: list[str] | None = None,
    max_pixels: str | None = None,
    prefill_len: int | None = None,
    max_len: int | None = None,
    tp: int | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    on_bytes: Callable[[int], None] | None = None,
) -> DeployedLayout:
    """Write the vamc layout of SRC into DIR, atomically, every option checked first."""
    conversion = prepare_conversion(source, to="vamc")
    family = conversion.plan.family
    config = official_config(conversion.config)
    options = vamc_options(family, config, image=image, max_pixels=max_pixels, prefill_len=prefill_len,
                           max_len=max_len, tp=tp, dtype=dtype)
    out = Path(out) if out else vamc_output(conversion, options)
    name = weights_name(conversion)
    table = 2 * config["vocab_size"] * config["hidden_size"]
    with staged_directory(out, conversion.source_path, overwrite=overwrite,
                          needed=conversion.plan.total_bytes + table, what="the weights and embed_tokens.bin") as staging:
        weights = staging / "weights" / name
        conversion.write(weights, on_bytes=on_bytes)
        vacc_config = {**config, "auto_map": VENDOR[family]["auto_map"], "_attn_implementation": "eager",
                       "insert_slice": True}
        write_json_atomic(weights / "config_vacc.json", vacc_config)
        dump = prepare_dump(str(weights), out=staging / "embed_tokens.bin", dtype="float16")
        dump.write(on_bytes)
        tokenizer = [path for path in weights.iterdir() if path.name in TOKENIZER_FILES]
        if tokenizer:
            (staging / "tokenizer").mkdir()
            for path in tokenizer:
                shutil.copy2(path, staging / "tokenizer" / path.name)
        write_json_atomic(staging / "preprocess_config.json", _preprocess_config(weights, options))
        names = yaml_names(conversion, config, options)
        build = staging / "build_in" / "build"
        build.mkdir(parents=True)
        checkpoint = str((out / "weights" / name).absolute())
        (build / f"{family}_llm.yaml").write_text(_dump_yaml(llm_yaml(family, names["llm"], checkpoint, options)))
        (build / f"{family}_visual.yaml").write_text(
            _dump_yaml(visual_yaml(family, names["visual"], checkpoint, config, options)))
        (staging / "compile.sh").write_text(compile_script(family, config, name, names))
        (staging / "compile.sh").chmod(0o755)
        (staging / "README.md").write_text(_readme(conversion, family, config, name, names, options))
        manifest = _manifest(conversion, staging, family, config, name, names, options)
        write_json_atomic(staging / MANIFEST, manifest)
    return DeployedLayout(out, manifest)


def vamc_output(conversion: Conversion, options: VamcOptions) -> Path:
    """Where the layout goes without --out: the cache for a catalog model (keyed by the numbers), else beside
    the source."""
    return conversion_output(conversion.model, conversion.source_path, "vamc",
                             {"n": options.visual_patches, "prefill": options.prefill_length,
                              "max": options.max_length, "tp": options.tp})


def weights_name(conversion: Conversion) -> str:
    """The weight folder's name: the hub repository's (Qwen2-VL-7B-Instruct), else the model's or the source's."""
    if conversion.model is not None:
        return (conversion.model.hf_repo or conversion.model.name).rsplit("/", 1)[-1]
    assert conversion.source_path is not None
    return conversion.source_path.name


def yaml_names(conversion: Conversion, config: dict, options: VamcOptions) -> dict[str, str]:
    """vamc output names as VastModelZOO's examples spell them, encoding layers, lengths, tp and dtype:
    qwen2_vl_7b_llm_28layer_2048_4096_tp4_fp16 and qwen2_vl_7b_visual_32layer_5120_fp16."""
    stem = conversion.model.name if conversion.model else conversion.source_path.name if conversion.source_path else "model"
    stem = "".join(c if c.isalnum() or c == "." else "_" for c in stem.lower())
    return {"llm": f"{stem}_llm_{config['num_hidden_layers']}layer_{options.prefill_length}_{options.max_length}"
                   f"_tp{options.tp}_fp16",
            "visual": f"{stem}_visual_{config['vision_config']['depth']}layer_{options.visual_patches}_fp16"}


def llm_yaml(family: str, name: str, checkpoint: str, options: VamcOptions) -> dict:
    """The LLM's vamc yaml (as VastModelZOO's build_in/build/<family>_llm.yaml): prefill and context lengths, tp,
    fp16."""
    return {
        "name": name,
        "frontend": {"checkpoint": checkpoint, "type": "huggingface",
                     "shape": {"input_ids": [[options.prefill_length], [options.max_length]]},
                     "model_kwargs": {"tp": options.tp, "model_arch": "vacc"}},
        "backend": {"type": "tvm_vacc", "dtype": "fp16", "merge_params": True, "remove_params": False,
                    "compile": {"data_type": 0, "gather_data_vccl_dsp_enable": True, "attention_split_num": 16,
                                "ffn_split_num": 16}},
        "workspace": {"path": "vamc_results", "pyenv": PYENV[family], "env_recheck": False, "workers": 4},
    }


def visual_yaml(family: str, name: str, checkpoint: str, config: dict, options: VamcOptions) -> dict:
    """The vision tower's vamc yaml (as VastModelZOO's <family>_visual.yaml): N patch rows, cos/sin as wide as a
    vision head, the output
    in 640-column chunks."""
    n, head_dim = options.visual_patches, vision_head_dim(config)
    patch_values = _patch_values(config)
    chunks = visual_output_split(config["hidden_size"], OUTPUT_CHUNK)
    compile_options: dict = {"data_type": 0, "data_transport_mode": 1, "attention_split_num": 32, "ffn_split_num": 4,
                             "llm_build": True, "output_layout": [f"{i}:YX" for i in range(len(chunks))]}
    if family == "qwen2_5_vl":
        compile_options["fullatt_block_indexes"] = list(config["vision_config"]["fullatt_block_indexes"])
    return {
        "name": name,
        "frontend": {"checkpoint": checkpoint, "type": "huggingface",
                     "shape": {"pixel_values": [n, patch_values], "attention_mask": [1, n, n],
                               "cos": [n, head_dim], "sin": [n, head_dim]},
                     "model_kwargs": {"model_arch": "vacc", "build_visual": True}},
        "backend": {"type": "tvm_vacc", "dtype": "fp16", "compile": compile_options},
        "workspace": {"path": "vamc_results", "pyenv": PYENV[family], "env_recheck": False},
    }


def vision_head_dim(config: dict) -> int:
    vision = config["vision_config"]
    return int(vision.get("embed_dim") or vision["hidden_size"]) // int(vision["num_heads"])


def needs_stack_size(family: str, config: dict) -> bool:
    """VACC_STACK_SIZE=256 for the compile: Qwen2.5-VL's recipe exports it before both `vamc compile` runs
    (VastModelZOO vlm/qwen2_5_vl/README.md), llm/README.md for any model of 32B and up."""
    return family == "qwen2_5_vl" or sum(math.prod(s) for _, s in families.FAMILIES[family].official_tensors(config)) >= 32e9


def compile_script(family: str, config: dict, weights: str, names: dict[str, str]) -> str:
    """compile.sh: checks for vamc and the vendor files, the two `vamc compile` runs with the environment each
    needs, then tokenizer/ and preprocess_config.json placed beside the compiled networks."""
    vendor = " ".join(VENDOR[family]["files"])
    # exported, so both compiles see it, as VastModelZOO's vlm/qwen2_5_vl/README.md runs them
    stack = "export VACC_STACK_SIZE=256\n" if needs_stack_size(family, config) else ""
    llm, visual = (shlex.quote(names[k]) for k in ("llm", "visual"))
    return f"""#!/usr/bin/env bash
# Compile this layout with VastAI's vamc (written by vlhub {__version__}); about 7 hours per network on the
# published 7B numbers. Outputs land in ./vamc_results/<name>/.
set -euo pipefail
cd "$(dirname "$0")"
fail() {{ echo "error: $*" >&2; exit 2; }}
command -v vamc >/dev/null || fail "vamc is not on PATH: install VastAI's vamc (VastModelZOO docs) first"
for file in {vendor}; do
    [ -f "weights/{weights}/$file" ] || fail "weights/{weights}/$file is missing: copy the vacc modeling files \\
from VastModelZOO {VENDOR[family]["directory"]}/ into weights/{weights}/ (see README.md)"
done
{stack}vamc compile build_in/build/{family}_visual.yaml
vamc compile build_in/build/{family}_llm.yaml
[ ! -d tokenizer ] || cp -r tokenizer vamc_results/{llm}/
cp preprocess_config.json vamc_results/{visual}/
cp embed_tokens.bin embed_tokens.json vamc_results/{llm}/
"""


def _preprocess_config(weights: Path, options: VamcOptions) -> dict:
    """The processor's settings (when the source has them) with the pixel bounds the visual N holds."""
    source = weights / "preprocessor_config.json"
    config = json.loads(source.read_text()) if source.is_file() else {}
    return {**config, "min_pixels": options.min_pixels, "max_pixels": options.max_pixels}


def _dump_yaml(document: dict) -> str:
    header = f"# written by vlhub {__version__}: every number computed from config.json and the image budget\n"
    return header + yaml.safe_dump(document, sort_keys=False, default_flow_style=None)


def _manifest(conversion: Conversion, staging: Path, family: str, config: dict, weights: str,
              names: dict[str, str], options: VamcOptions) -> dict:
    weights_manifest = json.loads((staging / "weights" / weights / MANIFEST).read_text())
    files = {f"weights/{weights}/{name}": entry for name, entry in weights_manifest["files"].items()}
    for path in sorted(p for p in staging.rglob("*") if p.is_file() and not p.is_relative_to(staging / "weights")):
        files[path.relative_to(staging).as_posix()] = file_entry(path)
    for name in (f"weights/{weights}/{MANIFEST}", f"weights/{weights}/config_vacc.json"):
        files[name] = file_entry(staging / name)
    vision = config["vision_config"]
    return {
        "vlhub_version": __version__,
        "created": now_iso(),
        "source": weights_manifest["source"],
        "target": {
            "name": "vamc", "family": family, "smoke_path": f"weights/{weights}", "dtype": "float16",
            "weights": f"weights/{weights}", "embed_tokens": "embed_tokens.bin",
            "llm": {"name": names["llm"], "yaml": f"build_in/build/{family}_llm.yaml",
                    "prefill_length": options.prefill_length, "max_length": options.max_length, "tp": options.tp,
                    "layers": config["num_hidden_layers"], "hidden_size": config["hidden_size"],
                    "attention_heads": config["num_attention_heads"], "kv_heads": config["num_key_value_heads"]},
            "visual": {"name": names["visual"], "yaml": f"build_in/build/{family}_visual.yaml",
                       "patches": options.visual_patches, "tokens": options.visual_tokens,
                       "depth": vision["depth"], "head_dim": vision_head_dim(config),
                       "output_split": visual_output_split(config["hidden_size"], OUTPUT_CHUNK),
                       "fullatt_block_indexes": vision.get("fullatt_block_indexes")},
            "pixels": {"min": options.min_pixels, "max": options.max_pixels,
                       "images": [list(size) for size in options.images]},
            "pyenv": PYENV[family], "stack_size": 256 if needs_stack_size(family, config) else None,
            "vendor_files": {"directory": VENDOR[family]["directory"], "files": list(VENDOR[family]["files"])},
            "options": asdict(options),
        },
        "files": files,
    }


def _readme(conversion: Conversion, family: str, config: dict, weights: str, names: dict[str, str],
            options: VamcOptions) -> str:
    model = conversion.model.name if conversion.model else weights
    vendor = VENDOR[family]
    split = visual_output_split(config["hidden_size"], OUTPUT_CHUNK)
    devices = list(range(options.tp))
    stack = (" `compile.sh` exports `VACC_STACK_SIZE=256` before both compiles, as VastModelZOO's "
             "`vlm/qwen2_5_vl/README.md` does (and its `llm/README.md` asks for any model of 32B and up)."
             if needs_stack_size(family, config) else "")
    return "\n".join([
        f"# {model} for VastAI VACC (vamc + vastgenx)",
        "",
        (f"Written by vlhub {__version__}. Visual network: N = {options.visual_patches} patch rows (images up to "
         f"{options.max_pixels:,} pixels after smart_resize, {options.visual_tokens} visual tokens). LLM: prefill "
         f"{options.prefill_length}, context {options.max_length}, tensor parallel {options.tp}, fp16."),
        "",
        "| path | what it is |",
        "|---|---|",
        (f"| `weights/{weights}/` | the HF folder both yamls' `frontend.checkpoint` name: official key names, "
         "`config.json`, `config_vacc.json` (auto_map, eager attention, insert_slice) |"),
        f"| `build_in/build/{family}_llm.yaml`, `{family}_visual.yaml` | the `vamc compile` inputs |",
        ("| `embed_tokens.bin`, `embed_tokens.json` | float16 [vocab, hidden] rows, no header; the host embeds "
        "tokens with it (the LLM takes inputs_embeds) |"),
        ("| `preprocess_config.json` | min/max pixels for vastgenx, consistent with N (schema inferred: vastgenx "
        "reads `--min_pixels/--max_pixels` defaults from it; the rest of its schema is not public) |"),
        "| `compile.sh` | checks vamc and the vendor files, compiles both networks, places the host files |",
        "| `vlhub-manifest.json` | every number, the vendor files expected, every file's sha256 |",
        "",
        "## Vendor files",
        "",
        (f"vamc builds the vacc modeling named in `config_vacc.json`'s auto_map. Copy "
         f"{', '.join(f'`{f}`' for f in vendor['files'])} from VastModelZOO `{vendor['directory']}/` into "
         f"`weights/{weights}/` (they are VastAI's, not vlhub's to ship). `vlhub check` reports whether they are "
         "there." + (" VastModelZOO's Qwen2.5-VL recipe also replaces `config.json` with its vacc variant: "
                     "copy `config_vacc.json` over it if your vamc reads config.json." if family == "qwen2_5_vl" else
                     " The auto_map also names `processing_qwen2_vl.Qwen2VLProcessor`, as the vendor's own "
                     "`config_vacc.json` does, but that folder holds no `processing_qwen2_vl.py` (only "
                     "`config_vacc.json`, `configuration_qwen2_vl.py`, `export_onnx.py` and "
                     "`modeling_qwen2_vl_vacc.py`), so compile.sh asks for the two the model classes come from: "
                     "the modeling file auto_map's AutoModel names and the configuration module it imports.")),
        "",
        "## Compile",
        "",
        (f"vamc's own environment pins transformers {PYENV[family]['transformers']} and huggingface-hub "
         f"{PYENV[family]['huggingface-hub']} (the yamls' `workspace.pyenv`).{stack}"),
        "",
        "```bash",
        "./compile.sh",
        f"# vamc compile build_in/build/{family}_visual.yaml  ->  vamc_results/{names['visual']}",
        f"# vamc compile build_in/build/{family}_llm.yaml     ->  vamc_results/{names['llm']}",
        "```",
        "",
        (f"The visual output [tokens, {config['hidden_size']}] comes back in {len(split)} column chunks "
         f"({' + '.join(map(str, split))}), concatenated on the host. The runtime pads pixel_values to N rows; "
         "the block-diagonal attention_mask hides the padding. Where embed_tokens.bin goes is not documented "
         "publicly; compile.sh puts it beside the compiled LLM."),
        "",
        "## Serve",
        "",
        "```bash",
        (f"vastgenx serve --model vamc_results/{names['llm']} --vit_model vamc_results/{names['visual']} "
         f"--port 9900 --llm_devices \"{devices}\" --vit_devices \"[{options.tp}]\" "
         f"--min_pixels {options.min_pixels} --max_pixels {options.max_pixels}"),
        "```",
        "",
        ("Images larger than `--max_pixels` are resized down by the processor; a larger value than the one above "
         f"gives more than {options.visual_patches} patches, which the visual network cannot take."),
        "",
    ])


def _pixel_count(text: str) -> int:
    try:
        value = int(text.replace("_", "").replace(",", ""))
    except ValueError:
        raise UserError(f"--max-pixels {text!r}: give the largest image's pixel count for --to vamc, e.g. "
                        f"{DEFAULT_MAX_PIXELS}") from None
    if value < 1:
        raise UserError(f"--max-pixels {value} must be positive")
    return value


def _patch_values(config: dict) -> int:
    """Values per patch row: 3 channels x temporal patch x patch x patch (1176)."""
    geometry = VisionGeometry.from_config(config)
    return 3 * geometry.temporal_patch * geometry.patch ** 2


def check_smoke_image_fits(options: VamcOptions) -> None:
    """The smoke test pads the smoke image to N rows: N must hold it."""
    if options.visual_patches < SMOKE_PATCHES:
        height, width = SMOKE_IMAGE
        raise UserError(f"the visual N of {options.visual_patches} patches is below the smoke test's {width}x{height} "
                        f"image ({SMOKE_PATCHES}); give a larger budget, or pass --no-smoke")


def _check(family: str, config: dict, source_dtype: str, smoke: bool, **options: object) -> None:
    checked = vamc_options(family, config, **options)  # type: ignore[arg-type]
    if smoke:
        check_smoke_image_fits(checked)


def _output(conversion: Conversion, **options: object) -> Path:
    checked = vamc_options(conversion.plan.family, official_config(conversion.config), **options)  # type: ignore[arg-type]
    return vamc_output(conversion, checked)


def _progress(conversion: Conversion, **_options: object) -> tuple[str, int]:
    config = official_config(conversion.config)
    return "writing the vamc layout", conversion.plan.total_bytes + 2 * config["vocab_size"] * config["hidden_size"]


DEPLOYMENT = Deployment(
    name="vamc",
    options=("image", "max_pixels", "prefill_len", "max_len", "tp", "dtype"),
    check=_check,
    output=_output,
    build=build_vamc,
    progress=_progress,
    summary="{weights}/ for vamc, build_in/build/*.yaml, embed_tokens.bin and compile.sh; its README.md says how "
            "to compile and serve it",
)


def vamc_problems(layout: Path) -> list[str]:
    """What is wrong with the numbers of the vamc layout at `layout` (empty when nothing is): each yaml against
    the weight folder's config.json and the other yaml, and the pixel budget against the visual N."""
    target = json.loads((layout / MANIFEST).read_text())["target"]
    family = target["family"]
    config = official_config(json.loads((layout / target["weights"] / "config.json").read_text()))
    build = layout / "build_in" / "build"
    try:
        llm = yaml.safe_load((build / f"{family}_llm.yaml").read_text())
        visual = yaml.safe_load((build / f"{family}_visual.yaml").read_text())
        preprocess = json.loads((layout / "preprocess_config.json").read_text())
        (prefill,), (longest,) = llm["frontend"]["shape"]["input_ids"]
        tp = llm["frontend"]["model_kwargs"]["tp"]
        shapes = visual["frontend"]["shape"]
        n = shapes["pixel_values"][0]
        layouts = visual["backend"]["compile"]["output_layout"]
        checkpoints = {llm["frontend"]["checkpoint"], visual["frontend"]["checkpoint"]}
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as exc:
        return [f"the yamls or preprocess_config.json cannot be read: {exc}"]
    head_dim = vision_head_dim(config)
    kv_heads = int(config["num_key_value_heads"])
    split = visual_output_split(config["hidden_size"], OUTPUT_CHUNK)
    try:  # the input_ids lengths, checked as `vlhub convert` checks --prefill-len and --max-len
        vamc_lengths(config, n, prefill=prefill, longest=longest)
        lengths = ""
    except UserError as exc:
        lengths = f"input_ids [[{prefill}],[{longest}]]: {exc}"
    checks = [
        (not lengths, lengths),
        (tp >= 1 and kv_heads % tp == 0, f"tp {tp} does not divide the {kv_heads} KV heads"),
        (n % patch_multiple(config) == 0, f"visual N {n} is not a multiple of {patch_multiple(config)}"),
        (shapes["pixel_values"] == [n, _patch_values(config)],
         f"pixel_values {shapes['pixel_values']} is not [N, {_patch_values(config)}]"),
        (shapes["attention_mask"] == [1, n, n], f"attention_mask {shapes['attention_mask']} is not [1, {n}, {n}]"),
        (shapes["cos"] == shapes["sin"] == [n, head_dim], f"cos/sin are not [{n}, {head_dim}] (the vision head)"),
        (max_pixels_patches(config, int(preprocess.get("max_pixels", 0))) <= n,
         (f"preprocess_config.json's max_pixels {preprocess.get('max_pixels')} allows "
         f"{max_pixels_patches(config, int(preprocess.get('max_pixels', 0)))} patches, more than N {n}")),
        (len(layouts) == len(split), (f"{len(layouts)} output_layout entries for {len(split)} output chunks "
                                     f"({' + '.join(map(str, split))} = {config['hidden_size']})")),
        (checkpoints == {str((layout / target["weights"]).absolute())},
         f"frontend.checkpoint {sorted(checkpoints)} is not this layout's {target['weights']} (moved? convert again)"),
    ]
    if family == "qwen2_5_vl":
        indexes = visual["backend"]["compile"].get("fullatt_block_indexes")
        checks.append((indexes == list(config["vision_config"]["fullatt_block_indexes"]),
                       (f"fullatt_block_indexes {indexes} are not the config's "
                       f"{config['vision_config']['fullatt_block_indexes']}")))
    return [message for passed, message in checks if not passed]
