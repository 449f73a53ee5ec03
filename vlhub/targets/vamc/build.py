"""`vlhub convert SRC --to vamc`: the VastAI VACC layout of a checkpoint of a family VastModelZOO has a recipe for
(its `[targets.vamc]` facts), every number computed (`plan.py`) and checked. Sources: VastModelZOO's vlm/ recipes
(README.md, build_in/build/*.yaml, build_in/source_code/), llm/README.md.

    DIR/weights/<name>/                 the HF folder both yamls' frontend.checkpoint name: official key names,
                                        config.json, config_vacc.json (auto_map, eager attention, insert_slice),
                                        tokenizer and processor files; the vendor's *_vacc.py files go here
    DIR/build_in/build/<recipe>_llm.yaml, <recipe>_visual.yaml   the two `vamc compile` inputs
    DIR/embed_tokens.bin, embed_tokens.json     the float16 [vocab, hidden] table the host embeds with
    DIR/preprocess_config.json          min/max pixels for vastgenx, consistent with the visual N
    DIR/tokenizer/                      when the source has tokenizer files
    DIR/compile.sh, README.md, vlhub-manifest.json

The visual network takes N patch rows (a multiple of 16 and of the 2x2 merge unit): the largest image the
pixel budget allows, padded. The LLM takes a prefill of P tokens (the image's N/4 plus a prompt) and a
context of M, both multiples of 16 (`plan.vamc_lengths`, which `vlhub plan` sizes them with too);
tp splits the KV heads across dies, so it divides them."""

from __future__ import annotations

import json
import math
import shlex
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from vlhub import __version__
from vlhub.atomic import staged_directory
from vlhub.convert.configs import official_config
from vlhub.convert.conversion import Conversion
from vlhub.deploy.target import OnBytes
from vlhub.embeddings import prepare_dump
from vlhub.errors import UserError
from vlhub.family_registry import FAMILIES, Family
from vlhub.formats.writers import write_json_atomic
from vlhub.manifest import MANIFEST, FileEntry, Manifest, TargetRecord, listed_path
from vlhub.sizes import (
    max_pixels_for,
    parse_pixel_count,
    parse_size_pair,
    patch_multiple,
    plan_inputs,
    round_up,
)
from vlhub.smoke.inputs import MIN_PIXELS, SMOKE_IMAGE, SMOKE_PATCHES, VisionGeometry
from vlhub.targets.vamc.plan import MAX_VAMC_PATCHES, NAME, OUTPUT_CHUNK, vamc_lengths, visual_output_split
from vlhub.units import plural

DEFAULT_MAX_PIXELS = 14 * 14 * 4 * 1280  # the VastModelZOO README's default: 5120 patches, 1280 tokens
PREFERRED_TP = 4  # VastModelZOO's builds: one die per shard, four dies
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja")


@dataclass(frozen=True)
class Recipe:
    """VastModelZOO's recipe for one family (its `[targets.vamc]` facts): the yamls' stem, the pinned environment,
    the vendor files the weight folder needs and the auto_map naming them, and whether it sets VACC_STACK_SIZE."""

    name: str
    pyenv: dict[str, str]
    vendor_directory: str
    vendor_files: tuple[str, ...]
    auto_map: dict[str, str]
    stack_size: bool
    vendor_note: str

    @classmethod
    def of(cls, family: Family) -> Recipe:
        """The family's recipe; UserError when it has none."""
        facts = family.route(NAME)
        return cls(facts["recipe"], facts["pyenv"], facts["vendor_directory"], tuple(facts["vendor_files"]),
                   facts["auto_map"], facts["stack_size"], facts["vendor_note"])


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


def vamc_options(family: Family, config: dict, *, image: tuple[str, ...] = (), max_pixels: str | None = None,
                 prefill_len: int | None = None, max_len: int | None = None, tp: int | None = None,
                 dtype: str | None = None) -> VamcOptions:
    """The options as given, defaults computed from the model's flat config and the image budget (the
    `--image` sizes as `vlhub plan` counts them, else `--max-pixels`, else VastModelZOO's 1,003,520), refused
    with the valid range; UserError for a family with no route."""
    family.route(NAME)
    if dtype not in (None, "float16"):
        raise UserError(f"--dtype {dtype}: the vamc recipes compile float16 (backend dtype fp16); int8 builds need "
                        "a GPTQ checkpoint, which vlhub does not make")
    if image and max_pixels:
        raise UserError("give the image budget as --image WxH (the sizes you will send) or as --max-pixels N, "
                        "not both")
    min_pixels = MIN_PIXELS
    sizes = tuple(parse_size_pair(text, "--image") for text in image)
    if sizes:  # at the processor's own bounds, as `vlhub plan` resizes them: the N it prints is the N built
        needed = max(item.patches for item in plan_inputs(config, images=list(sizes)))
        why = f"the largest --image ({needed} patches)"
    else:
        budget = (parse_pixel_count(max_pixels, "--max-pixels", "for --to vamc the largest image's", DEFAULT_MAX_PIXELS,
                                    or_image=True) if max_pixels else DEFAULT_MAX_PIXELS)
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


@dataclass(frozen=True)
class VamcSpec:
    """The layout's numbers settled against the model (vamc compiles the weights as they are stored)."""

    family: Family
    options: VamcOptions
    dtype: str | None = None
    allow_unmatched: bool = False

    def cache_key(self) -> dict[str, object]:
        options = self.options
        return {"n": options.visual_patches, "prefill": options.prefill_length, "max": options.max_length,
                "tp": options.tp}


def build_vamc(conversion: Conversion, spec: VamcSpec, out: Path, *, overwrite: bool = False,
               on_bytes: OnBytes = None) -> Manifest:
    """Write the vamc layout of the conversion into `out`, atomically."""
    family, options, recipe = spec.family, spec.options, Recipe.of(spec.family)
    config = official_config(conversion.config)
    name = weights_name(conversion)
    with staged_directory(out, conversion.source.local(), overwrite=overwrite,
                          needed=written_bytes(conversion.plan.total_bytes, config),
                          what="the weights and embed_tokens.bin") as staging:
        weights = staging / "weights" / name
        converted = conversion.write_into(weights, on_bytes=on_bytes)
        vacc_config = {**config, "auto_map": recipe.auto_map, "_attn_implementation": "eager", "insert_slice": True}
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
        (build / f"{recipe.name}_llm.yaml").write_text(_dump_yaml(llm_yaml(family, names["llm"], checkpoint, options)))
        (build / f"{recipe.name}_visual.yaml").write_text(
            _dump_yaml(visual_yaml(family, names["visual"], checkpoint, config, options)))
        (staging / "compile.sh").write_text(compile_script(family, config, name, names))
        (staging / "compile.sh").chmod(0o755)
        (staging / "README.md").write_text(_readme(conversion, family, config, name, names, options))
        manifest = _manifest(staging, spec, config, name, names, converted)
        manifest.write(staging)
    return manifest


def written_bytes(weights: int, config: dict) -> int:
    """The weights, and embed_tokens.bin: the embedding table in float16."""
    return weights + 2 * int(config["vocab_size"]) * int(config["hidden_size"])


def weights_name(conversion: Conversion) -> str:
    """The weight folder's name: the hub repository's (Qwen2-VL-7B-Instruct), else the model's or the source's."""
    model = conversion.source.model
    if model is not None:
        return (model.hf_repo or model.name).rsplit("/", 1)[-1]
    return conversion.source.local().name


def yaml_names(conversion: Conversion, config: dict, options: VamcOptions) -> dict[str, str]:
    """vamc output names as VastModelZOO's examples spell them, encoding layers, lengths, tp and dtype:
    qwen2_vl_7b_llm_28layer_2048_4096_tp4_fp16 and qwen2_vl_7b_visual_32layer_5120_fp16."""
    model, path = conversion.source.model, conversion.source.path
    stem = model.name if model else path.name if path else "model"
    stem = "".join(c if c.isalnum() or c == "." else "_" for c in stem.lower())
    return {"llm": f"{stem}_llm_{config['num_hidden_layers']}layer_{options.prefill_length}_{options.max_length}"
                   f"_tp{options.tp}_fp16",
            "visual": f"{stem}_visual_{config['vision_config']['depth']}layer_{options.visual_patches}_fp16"}


def llm_yaml(family: Family, name: str, checkpoint: str, options: VamcOptions) -> dict:
    """The LLM's vamc yaml (as VastModelZOO's build_in/build/<recipe>_llm.yaml): prefill and context lengths, tp,
    fp16."""
    return {
        "name": name,
        "frontend": {"checkpoint": checkpoint, "type": "huggingface",
                     "shape": {"input_ids": [[options.prefill_length], [options.max_length]]},
                     "model_kwargs": {"tp": options.tp, "model_arch": "vacc"}},
        "backend": {"type": "tvm_vacc", "dtype": "fp16", "merge_params": True, "remove_params": False,
                    "compile": {"data_type": 0, "gather_data_vccl_dsp_enable": True, "attention_split_num": 16,
                                "ffn_split_num": 16}},
        "workspace": {"path": "vamc_results", "pyenv": Recipe.of(family).pyenv, "env_recheck": False, "workers": 4},
    }


def visual_yaml(family: Family, name: str, checkpoint: str, config: dict, options: VamcOptions) -> dict:
    """The vision tower's vamc yaml (as VastModelZOO's <recipe>_visual.yaml): N patch rows, cos/sin as wide as a
    vision head, the output in 640-column chunks (and, for window attention, the full-attention blocks)."""
    n, head_dim = options.visual_patches, vision_head_dim(config)
    patch_values = _patch_values(config)
    chunks = visual_output_split(config["hidden_size"], OUTPUT_CHUNK)
    compile_options: dict = {"data_type": 0, "data_transport_mode": 1, "attention_split_num": 32, "ffn_split_num": 4,
                             "llm_build": True, "output_layout": [f"{i}:YX" for i in range(len(chunks))]}
    if family.vision.window_attention:
        compile_options["fullatt_block_indexes"] = list(config["vision_config"]["fullatt_block_indexes"])
    return {
        "name": name,
        "frontend": {"checkpoint": checkpoint, "type": "huggingface",
                     "shape": {"pixel_values": [n, patch_values], "attention_mask": [1, n, n],
                               "cos": [n, head_dim], "sin": [n, head_dim]},
                     "model_kwargs": {"model_arch": "vacc", "build_visual": True}},
        "backend": {"type": "tvm_vacc", "dtype": "fp16", "compile": compile_options},
        "workspace": {"path": "vamc_results", "pyenv": Recipe.of(family).pyenv, "env_recheck": False},
    }


def vision_head_dim(config: dict) -> int:
    vision = config["vision_config"]
    return int(vision.get("embed_dim") or vision["hidden_size"]) // int(vision["num_heads"])


def needs_stack_size(family: Family, config: dict) -> bool:
    """VACC_STACK_SIZE=256 for the compile: where the family's recipe exports it before both `vamc compile` runs
    (its `stack_size`), and, as VastModelZOO's llm/README.md asks, for any model of 32B and up."""
    return Recipe.of(family).stack_size or sum(math.prod(s) for _, s in family.official_tensors(config)) >= 32e9


def compile_script(family: Family, config: dict, weights: str, names: dict[str, str]) -> str:
    """compile.sh: checks for vamc and the vendor files, the two `vamc compile` runs with the environment each
    needs, then tokenizer/ and preprocess_config.json placed beside the compiled networks."""
    recipe = Recipe.of(family)
    vendor = " ".join(recipe.vendor_files)
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
from VastModelZOO {recipe.vendor_directory}/ into weights/{weights}/ (see README.md)"
done
{stack}vamc compile build_in/build/{recipe.name}_visual.yaml
vamc compile build_in/build/{recipe.name}_llm.yaml
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


def _manifest(staging: Path, spec: VamcSpec, config: dict, weights: str, names: dict[str, str],
              converted: Manifest) -> Manifest:
    family, options, recipe = spec.family, spec.options, Recipe.of(spec.family)
    files = {f"weights/{weights}/{name}": entry for name, entry in converted.files.items()}
    for path in sorted(p for p in staging.rglob("*") if p.is_file() and not p.is_relative_to(staging / "weights")):
        files[path.relative_to(staging).as_posix()] = FileEntry.of(path)
    for name in (f"weights/{weights}/{MANIFEST}", f"weights/{weights}/config_vacc.json"):
        files[name] = FileEntry.of(staging / name)
    vision = config["vision_config"]
    details = {
        "embed_tokens": "embed_tokens.bin",
        "llm": {"name": names["llm"], "yaml": f"build_in/build/{recipe.name}_llm.yaml",
                "prefill_length": options.prefill_length, "max_length": options.max_length, "tp": options.tp,
                "layers": config["num_hidden_layers"], "hidden_size": config["hidden_size"],
                "attention_heads": config["num_attention_heads"], "kv_heads": config["num_key_value_heads"]},
        "visual": {"name": names["visual"], "yaml": f"build_in/build/{recipe.name}_visual.yaml",
                   "patches": options.visual_patches, "tokens": options.visual_tokens,
                   "depth": vision["depth"], "head_dim": vision_head_dim(config),
                   "output_split": visual_output_split(config["hidden_size"], OUTPUT_CHUNK),
                   "fullatt_block_indexes": vision.get("fullatt_block_indexes")},
        "pixels": {"min": options.min_pixels, "max": options.max_pixels,
                   "images": [list(size) for size in options.images]},
        "pyenv": recipe.pyenv, "stack_size": 256 if needs_stack_size(family, config) else None,
        "vendor_files": {"directory": recipe.vendor_directory, "files": list(recipe.vendor_files)},
        "options": asdict(options),
    }
    target = TargetRecord(name=NAME, family=family.name, smoke_path=f"weights/{weights}", dtype="float16",
                          weights=f"weights/{weights}", details=details)
    return Manifest(converted.source, target, files)


def _readme(conversion: Conversion, family: Family, config: dict, weights: str, names: dict[str, str],
            options: VamcOptions) -> str:
    model = conversion.source.model.name if conversion.source.model else weights
    recipe = Recipe.of(family)
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
        *_planned_for(config, options),
        "",
        "| path | what it is |",
        "|---|---|",
        (f"| `weights/{weights}/` | the HF folder both yamls' `frontend.checkpoint` name: official key names, "
         "`config.json`, `config_vacc.json` (auto_map, eager attention, insert_slice) |"),
        f"| `build_in/build/{recipe.name}_llm.yaml`, `{recipe.name}_visual.yaml` | the `vamc compile` inputs |",
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
         f"{', '.join(f'`{f}`' for f in recipe.vendor_files)} from VastModelZOO `{recipe.vendor_directory}/` into "
         f"`weights/{weights}/` (they are VastAI's, not vlhub's to ship). `vlhub check` reports whether they are "
         f"there. {recipe.vendor_note}"),
        "",
        "## Compile",
        "",
        (f"vamc's own environment pins transformers {recipe.pyenv['transformers']} and huggingface-hub "
         f"{recipe.pyenv['huggingface-hub']} (the yamls' `workspace.pyenv`).{stack}"),
        "",
        "```bash",
        "./compile.sh",
        f"# vamc compile build_in/build/{recipe.name}_visual.yaml  ->  vamc_results/{names['visual']}",
        f"# vamc compile build_in/build/{recipe.name}_llm.yaml     ->  vamc_results/{names['llm']}",
        "```",
        "",
        (f"The visual output [tokens, {config['hidden_size']}] comes back in {plural(len(split), 'column chunk')} "
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


def _planned_for(config: dict, options: VamcOptions) -> list[str]:
    """The README's line on the --image sizes N was planned for, in `vlhub plan`'s words (sizes WxH, width first;
    VastModelZOO's documents write the height first: its 720x1280 is vlhub's 1280x720)."""
    if not options.images:
        return []
    planned = plan_inputs(config, images=list(options.images))
    sizes = ", ".join(f"input {item.width}x{item.height}: resized {item.resized_size}, {item.patches} patches"
                      for item in planned)
    return ["", f"Planned for `--image` (width x height) {sizes}."]


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


def vamc_problems(layout: Path) -> list[str]:
    """What is wrong with the numbers of the vamc layout at `layout` (empty when nothing is): each yaml against
    the weight folder's config.json and the other yaml, and the pixel budget against the visual N."""
    manifest = Manifest.load(layout)
    target = manifest.target
    assert target.weights is not None and target.family is not None
    config = official_config(json.loads((manifest.weights_dir(layout) / "config.json").read_text()))
    try:
        llm = yaml.safe_load(listed_path(layout, target.details["llm"]["yaml"]).read_text())
        visual = yaml.safe_load(listed_path(layout, target.details["visual"]["yaml"]).read_text())
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
        (checkpoints == {str((layout / target.weights).absolute())},
         f"frontend.checkpoint {sorted(checkpoints)} is not this layout's {target.weights} (moved? convert again)"),
    ]
    if FAMILIES[target.family].vision.window_attention:
        indexes = visual["backend"]["compile"].get("fullatt_block_indexes")
        checks.append((indexes == list(config["vision_config"]["fullatt_block_indexes"]),
                       (f"fullatt_block_indexes {indexes} are not the config's "
                       f"{config['vision_config']['fullatt_block_indexes']}")))
    return [message for passed, message in checks if not passed]
