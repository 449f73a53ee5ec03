"""Checkpoints that transformers itself saves, from configs drawn by hypothesis.

vlhub's own tiny models share its assumptions (the official vocabulary, the official special-token ids,
its own config writer). These do not: the config classes are transformers' (`Qwen2VLConfig`,
`Qwen2_5_VLConfig`, `Qwen3VLConfig`, `Qwen3VLMoeConfig`, `Qwen3_5Config`, `Qwen3_5MoeConfig`), the weights come from
`save_pretrained`, and the drawn
values go where a real checkpoint may put them: small or official vocabularies with the special tokens anywhere in
them, widths and head counts that are not powers of two, GQA, tied or untied embeddings, Qwen2.5-VL windows and
full-attention blocks, Qwen3-VL head widths apart from the hidden size, DeepStack mergers, routed experts, Qwen3.5's
linear-attention layers anywhere in the stack (layer_types drawn), three dtypes, one to many shards, and the on-disk
forms users hold:

    official     `save_pretrained` as transformers 5 does it: official key names, nested config.json (a Qwen3-VL
                 MoE's experts as transformers holds them, [E, 2 x moe_inter, hidden]: its re-save form)
    memory-names `save_pretrained(save_original_format=False)`: `model.language_model.*`, `model.visual.*`
    flat-config  official names with the flat config.json of transformers 4 (text fields top-level)
    torch-bin    the same tensors as `pytorch_model-*.bin` shards written by `torch.save`
    hub-experts  a Qwen3-VL MoE as the Hub's files hold it: experts [E, hidden, 2 x moe_inter] and
                 [E, moe_inter, hidden]
    per-expert   a Qwen3-VL MoE with each expert's gate, up and down projections on their own, [out, in] (a
                 Qwen3.5 MoE's `official` form: transformers 5 saves its experts so)
    fused-experts  a Qwen3.5 MoE as its official files hold it: experts fused, [E, 2 x moe_inter, hidden] and
                 [E, hidden, moe_inter], in one file
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import strategies as st

# the families drawn; "qwen3_vl" draws dense and mixture-of-experts models
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5")
DISK_FORMS = {"qwen2_vl": ("official", "memory-names", "flat-config", "torch-bin"),
              "qwen2_5_vl": ("official", "memory-names", "flat-config", "torch-bin"),
              # official Qwen3-VL configs are nested and its in-memory names are the official ones
              "qwen3_vl": ("official", "torch-bin", "hub-experts", "per-expert"),
              "qwen3_5": ("official", "torch-bin", "fused-experts")}
MOE_FORMS = ("hub-experts", "per-expert", "fused-experts")  # drawn for a mixture-of-experts model only
DTYPES = ("bfloat16", "float16", "float32")
# the released vocabularies, and sizes a small research model or a resized fine-tune has
OFFICIAL_VOCAB = {"qwen2_vl": 151936, "qwen2_5_vl": 151936, "qwen3_vl": 151936, "qwen3_5": 248320}
# the processor's geometry is the same in every release of a family: patches merged 2x2, two frames a patch;
# Qwen2(.5)-VL 14-pixel patches, Qwen3-VL 16
PATCH = {"qwen2_vl": 14, "qwen2_5_vl": 14, "qwen3_vl": 16, "qwen3_5": 16}
MERGE, TEMPORAL = 2, 2


@dataclass(frozen=True)
class MoeDims:
    """Qwen3-VL and Qwen3.5 MoE: routed experts in every layer (Qwen3.5's beside a shared expert)."""

    experts: int
    per_token: int
    inter: int
    shared: int = 0


@dataclass(frozen=True)
class LinearAttentionDims:
    """Qwen3.5's Gated DeltaNet layers, and which layers are full attention instead."""

    key_heads: int
    value_heads: int
    key_dim: int
    value_dim: int
    kernel: int
    layer_types: tuple[str, ...]


@dataclass(frozen=True)
class TextDims:
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    tied: bool
    mrope_section: tuple[int, int, int]
    rope_theta: float
    width: int | None = None  # Qwen3-VL, Qwen3.5: a hidden size of its own (else heads x head_dim)
    moe: MoeDims | None = None
    linear: LinearAttentionDims | None = None  # Qwen3.5 only

    @property
    def hidden(self) -> int:
        return self.width or self.heads * self.head_dim


@dataclass(frozen=True)
class VisionDims:
    depth: int
    heads: int
    head_dim: int
    mlp: int  # Qwen2.5-VL and Qwen3-VL intermediate_size; Qwen2-VL embed_dim * mlp_ratio
    mlp_ratio: int  # Qwen2-VL only (transformers takes an integer)
    window_size: int  # Qwen2.5-VL only
    fullatt_blocks: tuple[int, ...]  # Qwen2.5-VL only
    position_side: int = 48  # Qwen3-VL only: the learned position table is side x side
    deepstack: tuple[int, ...] = ()  # Qwen3-VL only: the blocks whose output feeds a DeepStack merger (none in Qwen3.5)

    @property
    def width(self) -> int:
        return self.heads * self.head_dim


@dataclass(frozen=True)
class SpecialTokens:
    image: int
    video: int
    vision_start: int
    vision_end: int
    bos: int
    eos: int


@dataclass(frozen=True)
class CheckpointSpec:
    """Everything drawn for one checkpoint; `save_checkpoint` makes it with transformers."""

    family: str
    text: TextDims
    vision: VisionDims
    tokens: SpecialTokens
    dtype: str
    disk_form: str
    max_shard_size: int
    seed: int
    with_tokenizer: bool = False
    notes: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        t, v = self.text, self.vision
        moe = f", {t.moe.experts} experts (top {t.moe.per_token}) of {t.moe.inter}" if t.moe else ""
        return (f"{self.family} {self.disk_form} {self.dtype}: vocab {t.vocab}, hidden {t.hidden} "
                f"({t.heads}/{t.kv_heads} heads of {t.head_dim}), {t.layers} layers{moe}, tied {t.tied}; vision "
                f"{v.depth} x {v.width} ({v.heads} heads of {v.head_dim}); image token {self.tokens.image}; "
                f"shards <= {self.max_shard_size} bytes")


# A fresh Qwen2-VL and Qwen2.5-VL with dims no fixture of this project has, that every target takes: head_dim 64
# and intermediate 320 keep llm_convert's default quantization groups (64) whole, the vision heads are 80 wide
# as llm_convert requires, and the special tokens sit inside a 3001-token vocabulary
_FRESH_TEXT = TextDims(vocab=3001, heads=3, kv_heads=1, head_dim=64, intermediate=320, layers=2, tied=False,
                       mrope_section=(8, 12, 12), rope_theta=1000000.0)
_FRESH_TOKENS = SpecialTokens(image=2999, video=3000, vision_start=2997, vision_end=2998, bos=2995, eos=2996)
FRESH = {
    "qwen2_vl": CheckpointSpec("qwen2_vl", _FRESH_TEXT, VisionDims(2, 2, 80, 320, 2, 112, ()), _FRESH_TOKENS,
                               "bfloat16", "official", max_shard_size=1_000_000, seed=7),
    "qwen2_5_vl": CheckpointSpec("qwen2_5_vl", _FRESH_TEXT, VisionDims(2, 2, 80, 256, 2, 112, (1,)), _FRESH_TOKENS,
                                 "bfloat16", "official", max_shard_size=1_000_000, seed=8, with_tokenizer=True),
    # a dense Qwen3-VL whose heads (3 x 64) are wider than its hidden size (128), as Qwen3-VL-4B's are, with two
    # DeepStack mergers and a 6 x 6 position table; widths llm_convert's default quantization groups (64) divide
    "qwen3_vl": CheckpointSpec("qwen3_vl", TextDims(vocab=3001, heads=3, kv_heads=1, head_dim=64, intermediate=320,
                                                    layers=2, tied=False, mrope_section=(12, 10, 10),
                                                    rope_theta=5000000.0, width=128),
                               VisionDims(2, 2, 32, 128, 2, 112, (), position_side=6, deepstack=(0, 1)),
                               _FRESH_TOKENS, "bfloat16", "official", max_shard_size=1_000_000, seed=9),
}
# a dense Qwen3.5 of 4 layers (full attention in the last), heads (2 x 64) wider than its hidden size (128) and a
# quarter of each rotated, linear attention of 2 key heads over 4 value heads of 32; widths llm_convert takes
FRESH["qwen3_5"] = CheckpointSpec(
    "qwen3_5", TextDims(vocab=3001, heads=2, kv_heads=1, head_dim=64, intermediate=320, layers=4, tied=False,
                        mrope_section=(3, 3, 2), rope_theta=10000000.0, width=128,
                        linear=LinearAttentionDims(2, 4, 32, 32, 4, ("linear_attention",) * 3 + ("full_attention",))),
    VisionDims(2, 2, 32, 128, 2, 112, (), position_side=6), _FRESH_TOKENS, "bfloat16", "official",
    max_shard_size=1_000_000, seed=10)
# the targets a family has a route to (the others refuse it, tested elsewhere)
FRESH_TARGETS = {"qwen3_vl": ("paddle", "safetensors", "torch", "paddle-inference", "tpu-mlir"),
                 "qwen3_5": ("paddle", "safetensors", "torch", "tpu-mlir")}


@st.composite
def text_dims(draw: st.DrawFn, family: str, *, vocab: int | None = None) -> TextDims:
    heads = draw(st.sampled_from([1, 2, 3, 4, 5, 6]))
    kv_heads = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
    # Qwen3.5 rotates a quarter of each head: its interleaved sections cover head_dim / 8 slots
    head_dim = draw(st.sampled_from([8, 12, 16, 20, 24, 32] if family != "qwen3_5" else [24, 32, 48, 64]))
    half = head_dim // 2 if family != "qwen3_5" else head_dim // 8
    if family in ("qwen3_vl", "qwen3_5"):
        # interleaved M-RoPE: height and width take every third slot of the rotary half, up to 3 x their part
        second = draw(st.integers(1, half // 3))
        third = draw(st.integers(1, half // 3))
        section = (half - second - third, second, third)
    else:
        # M-RoPE splits the rotary half of each head between time, height and width, each part non-empty
        first = draw(st.integers(1, half - 2))
        second = draw(st.integers(1, half - first - 1))
        section = (first, second, half - first - second)
    drawn_vocab = vocab if vocab is not None else draw(st.one_of(
        st.integers(1000, 5000), st.sampled_from([OFFICIAL_VOCAB[family], 152064])))
    moe = None
    width = None
    linear = None
    if family == "qwen3_5":
        key_heads = draw(st.sampled_from([1, 2]))
        key_dim = draw(st.sampled_from([8, 16, 32]))
        layers = draw(st.integers(1, 5))
        # transformers' default (every fourth layer full attention) or any mix of the two kinds
        kinds = draw(st.one_of(st.just(tuple("full_attention" if (i + 1) % 4 == 0 else "linear_attention"
                                              for i in range(layers))),
                               st.lists(st.sampled_from(["linear_attention", "full_attention"]), min_size=layers,
                                        max_size=layers).map(tuple)))
        # key and value heads of one width, as every release has (llm_convert needs it), most of the time
        linear = LinearAttentionDims(key_heads, key_heads * draw(st.integers(1, 3)), key_dim,
                                     draw(st.sampled_from([key_dim, key_dim, 24])), draw(st.integers(2, 4)), kinds)
    if family in ("qwen3_vl", "qwen3_5"):
        # its own hidden size, apart from heads x head_dim; often a multiple of 64, as llm_convert's default
        # quantization groups need (else --to tpu-mlir refuses it)
        width = draw(st.one_of(st.sampled_from([64, 128, 192]), st.integers(8, 96).map(lambda n: 2 * n)))
        if draw(st.booleans()):
            experts = draw(st.integers(2, 8))
            # never an expert matrix as wide as it is tall (moe_inter or 2 x moe_inter equal to the hidden size):
            # transformers' loader then cannot tell the Hub's form from its own and leaves it untransposed
            inter = draw(st.integers(8, 64).filter(lambda n: width not in (n, 2 * n)))
            moe = MoeDims(experts, draw(st.integers(1, experts)), inter,
                          draw(st.integers(8, 64)) if family == "qwen3_5" else 0)
    return TextDims(
        vocab=drawn_vocab, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        intermediate=draw(st.integers(17, 160)),
        layers=len(linear.layer_types) if linear is not None else draw(st.integers(1, 4)), tied=draw(st.booleans()),
        mrope_section=section, rope_theta=draw(st.sampled_from([10000.0, 1000000.0, 5000000.0])),
        width=width, moe=moe, linear=linear,
    )


@st.composite
def vision_dims(draw: st.DrawFn, family: str) -> VisionDims:
    heads = draw(st.sampled_from([1, 2, 3]))
    # Qwen2(.5)-VL releases have 80, Qwen3-VL 72 and 64; the 2-D vision rotary needs a multiple of 4
    head_dim = draw(st.sampled_from([80, 80, 16, 20, 32, 40] if family not in ("qwen3_vl", "qwen3_5")
                                    else [64, 72, 16, 20, 32]))
    depth = draw(st.integers(1, 3))
    mlp_ratio = draw(st.sampled_from([1, 2, 3, 4]))
    width = heads * head_dim
    window = draw(st.sampled_from([56, 112, 224]))
    fullatt = draw(st.lists(st.integers(0, depth - 1), unique=True, max_size=depth).map(sorted))
    mlp = width * mlp_ratio if family == "qwen2_vl" else draw(st.integers(16, 3 * width))
    # Qwen3-VL: a position table of 2 x 2 to 48 x 48 (every release), DeepStack after any blocks, in any order
    side = draw(st.sampled_from([2, 5, 8, 48]))
    deepstack = draw(st.lists(st.integers(0, depth - 1), unique=True, max_size=depth)) if family == "qwen3_vl" else []
    return VisionDims(depth, heads, head_dim, mlp, mlp_ratio, window, tuple(fullatt), side, tuple(deepstack))


@st.composite
def special_tokens(draw: st.DrawFn, vocab: int, family: str = "qwen2_vl") -> SpecialTokens:
    """Six distinct ids anywhere in the vocabulary (the official ones when they fit, some of the time)."""
    official = ((248056, 248057, 248053, 248054, 248043, 248044) if family == "qwen3_5"
                else (151655, 151656, 151652, 151653, 151643, 151645))
    if vocab > max(official) and draw(st.booleans()):
        return SpecialTokens(*official)
    ids = draw(st.lists(st.integers(0, vocab - 1), min_size=6, max_size=6, unique=True))
    return SpecialTokens(*ids)


@st.composite
def checkpoint_specs(draw: st.DrawFn, family: str | None = None, *, disk_form: str | None = None,
                     vocab: int | None = None) -> CheckpointSpec:
    """A drawn checkpoint of `family` (or either), in `disk_form` (or any)."""
    family = family or draw(st.sampled_from(FAMILIES))
    text = draw(text_dims(family, vocab=vocab))
    forms = [form for form in DISK_FORMS[family] if form not in MOE_FORMS or text.moe is not None]
    return CheckpointSpec(
        family=family, text=text, vision=draw(vision_dims(family)), tokens=draw(special_tokens(text.vocab, family)),
        dtype=draw(st.sampled_from(DTYPES)), disk_form=disk_form or draw(st.sampled_from(forms)),
        max_shard_size=draw(st.sampled_from([40_000, 400_000, 50_000_000])), seed=draw(st.integers(0, 2**16)),
        with_tokenizer=draw(st.booleans()),
    )


def transformers_config(spec: CheckpointSpec):  # -> transformers.PretrainedConfig
    """The drawn checkpoint's config as transformers' own config class."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2VLConfig,
        Qwen3_5Config,
        Qwen3_5MoeConfig,
        Qwen3VLConfig,
        Qwen3VLMoeConfig,
    )

    t, v, tokens = spec.text, spec.vision, spec.tokens
    text = dict(
        vocab_size=t.vocab, hidden_size=t.hidden, intermediate_size=t.intermediate, num_hidden_layers=t.layers,
        num_attention_heads=t.heads, num_key_value_heads=t.kv_heads, bos_token_id=tokens.bos,
        eos_token_id=tokens.eos, tie_word_embeddings=t.tied,
        rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta, "mrope_section": list(t.mrope_section)},
    )
    common = dict(depth=v.depth, num_heads=v.heads, patch_size=PATCH[spec.family], spatial_merge_size=MERGE,
                  temporal_patch_size=TEMPORAL)
    ids = dict(image_token_id=tokens.image, video_token_id=tokens.video, vision_start_token_id=tokens.vision_start,
               vision_end_token_id=tokens.vision_end, tie_word_embeddings=t.tied)
    if spec.family == "qwen2_vl":
        vision = dict(common, embed_dim=v.width, hidden_size=t.hidden, mlp_ratio=v.mlp_ratio)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    if spec.family == "qwen3_vl":
        text.update(head_dim=t.head_dim)
        text["rope_parameters"]["mrope_interleaved"] = True
        vision = dict(common, hidden_size=v.width, intermediate_size=v.mlp, out_hidden_size=t.hidden,
                      num_position_embeddings=v.position_side ** 2, deepstack_visual_indexes=list(v.deepstack))
        if t.moe is None:
            return Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
        text.update(num_experts=t.moe.experts, num_experts_per_tok=t.moe.per_token, moe_intermediate_size=t.moe.inter)
        return Qwen3VLMoeConfig(text_config=text, vision_config=vision, **ids)
    if spec.family == "qwen3_5":
        linear = t.linear
        assert linear is not None
        text.update(head_dim=t.head_dim, linear_num_key_heads=linear.key_heads,
                    linear_num_value_heads=linear.value_heads, linear_key_head_dim=linear.key_dim,
                    linear_value_head_dim=linear.value_dim, linear_conv_kernel_dim=linear.kernel,
                    layer_types=list(linear.layer_types))
        text["rope_parameters"].update(mrope_interleaved=True, partial_rotary_factor=0.25)
        vision = dict(common, hidden_size=v.width, intermediate_size=v.mlp, out_hidden_size=t.hidden,
                      num_position_embeddings=v.position_side ** 2)
        if t.moe is None:
            return Qwen3_5Config(text_config=text, vision_config=vision, **ids)
        text.update(num_experts=t.moe.experts, num_experts_per_tok=t.moe.per_token, moe_intermediate_size=t.moe.inter,
                    shared_expert_intermediate_size=t.moe.shared)
        return Qwen3_5MoeConfig(text_config=text, vision_config=vision, **ids)
    vision = dict(common, hidden_size=v.width, intermediate_size=v.mlp, out_hidden_size=t.hidden,
                  window_size=v.window_size, fullatt_block_indexes=list(v.fullatt_blocks))
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)


def model_class(spec: CheckpointSpec) -> type:
    """transformers' model class of the drawn family."""
    import transformers

    if spec.family == "qwen3_vl":
        return (transformers.Qwen3VLMoeForConditionalGeneration if spec.text.moe
                else transformers.Qwen3VLForConditionalGeneration)
    if spec.family == "qwen3_5":
        return (transformers.Qwen3_5MoeForConditionalGeneration if spec.text.moe
                else transformers.Qwen3_5ForConditionalGeneration)
    return (transformers.Qwen2VLForConditionalGeneration if spec.family == "qwen2_vl"
            else transformers.Qwen2_5_VLForConditionalGeneration)


def build_model(spec: CheckpointSpec):  # -> transformers.PreTrainedModel
    """The drawn model with transformers' own initialisation, seeded, in the drawn dtype, in eval mode."""
    import torch

    torch.manual_seed(spec.seed)
    model = model_class(spec)(transformers_config(spec))
    return model.to(getattr(torch, spec.dtype)).eval()


def save_checkpoint(spec: CheckpointSpec, directory: Path):  # -> transformers.PreTrainedModel
    """Save the drawn checkpoint into `directory` with transformers; returns the model (to compare with)."""
    model = build_model(spec)
    model.save_pretrained(directory, max_shard_size=spec.max_shard_size,
                          save_original_format=spec.disk_form != "memory-names")
    if spec.disk_form == "flat-config":
        _flatten_config(directory / "config.json")
    elif spec.disk_form == "torch-bin":
        _to_torch_bin(directory)
    elif spec.disk_form == "hub-experts":
        _experts_as_on_the_hub(directory)
    elif spec.disk_form == "per-expert":
        _experts_one_by_one(directory)
    elif spec.disk_form == "fused-experts":
        _experts_fused(directory, model)
    if spec.with_tokenizer:
        save_tokenizer(spec, directory)
    return model


def _flatten_config(path: Path) -> None:
    """config.json as transformers 4 wrote it: text fields top-level, `rope_theta` and `rope_scaling`, `torch_dtype`.
    transformers 5 still reads this form (tests check that it loads the same dims)."""
    nested = json.loads(path.read_text())
    text = nested.pop("text_config")
    rope = text.pop("rope_parameters")
    flat = {**{k: v for k, v in text.items() if k not in ("model_type", "layer_types", "dtype")}, **nested}
    flat["torch_dtype"] = flat.pop("dtype", None)
    flat["rope_theta"] = rope["rope_theta"]
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    flat["vision_config"] = {k: v for k, v in nested["vision_config"].items() if k != "rope_parameters"}
    path.write_text(json.dumps(flat, indent=2))


def _experts_as_on_the_hub(directory: Path) -> None:
    """Rewrite each shard with the MoE expert tensors as the Hub's Qwen3-VL files hold them: each expert's
    matrix transposed, [E, hidden, 2 x moe_inter] and [E, moe_inter, hidden] (transformers' loader transposes
    them back)."""
    from safetensors.torch import load_file, save_file

    for shard in sorted(directory.glob("*.safetensors")):
        tensors = load_file(shard)
        for name in [name for name in tensors if name.endswith((".experts.gate_up_proj", ".experts.down_proj"))]:
            tensors[name] = tensors[name].transpose(1, 2).contiguous()
        save_file(tensors, shard, metadata={"format": "pt"})


def per_expert(tensors: dict) -> dict:
    """A Qwen3-VL MoE's tensors (transformers' in-memory experts, [E, 2 x inter, hidden] and [E, hidden, inter])
    with every expert's gate, up and down projections as tensors of their own, [out, in]
    (`mlp.experts.{e}.gate_proj.weight`, ...)."""
    split = {}
    for name, tensor in tensors.items():
        base, _, kind = name.rpartition(".")
        if kind == "gate_up_proj":  # gate rows, then up rows
            inter = tensor.shape[1] // 2
            for expert in range(tensor.shape[0]):
                split[f"{base}.{expert}.gate_proj.weight"] = tensor[expert, :inter].contiguous()
                split[f"{base}.{expert}.up_proj.weight"] = tensor[expert, inter:].contiguous()
        elif kind == "down_proj" and base.endswith(".experts"):
            for expert in range(tensor.shape[0]):
                split[f"{base}.{expert}.down_proj.weight"] = tensor[expert].contiguous()
        else:
            split[name] = tensor
    return split


def _experts_one_by_one(directory: Path) -> None:
    """Rewrite each shard with its experts one by one (`per_expert`), the index following."""
    from safetensors.torch import load_file, save_file

    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    for shard in sorted(directory.glob("*.safetensors")):
        split = per_expert(load_file(shard))
        save_file(split, shard, metadata={"format": "pt"})
        if index is not None:
            index["weight_map"].update(dict.fromkeys(split, shard.name))
    if index is not None:
        index["weight_map"] = {name: file for name, file in index["weight_map"].items()
                               if not name.endswith((".experts.gate_up_proj", ".experts.down_proj"))}
        index_path.write_text(json.dumps(index, indent=2))


def _experts_fused(directory: Path, model) -> None:
    """Rewrite the checkpoint as one file of the model's own tensors (a Qwen3.5 MoE's experts fused, as its
    official files hold them), in the saved dtypes."""
    from safetensors.torch import save_file

    for shard in directory.glob("model*.safetensors*"):
        shard.unlink()
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()
               if not (name == "lm_head.weight" and model.config.tie_word_embeddings)},
              directory / "model.safetensors", metadata={"format": "pt"})


def _to_torch_bin(directory: Path) -> None:
    """Rewrite each safetensors shard as a `torch.save` pickle (`pytorch_model-*.bin`) with its own index."""
    import torch
    from safetensors.torch import load_file

    index_path = directory / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        shards = sorted(set(index["weight_map"].values()))
    else:
        index, shards = None, ["model.safetensors"]
    renamed = {}
    for number, shard in enumerate(shards, 1):
        new = "pytorch_model.bin" if index is None else f"pytorch_model-{number:05d}-of-{len(shards):05d}.bin"
        torch.save(load_file(directory / shard), directory / new)
        (directory / shard).unlink()
        renamed[shard] = new
    if index is not None:
        index["weight_map"] = {name: renamed[shard] for name, shard in index["weight_map"].items()}
        (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
        index_path.unlink()


def save_tokenizer(spec: CheckpointSpec, directory: Path) -> None:
    """A word-level tokenizer saved by transformers, whose special tokens sit at the drawn ids: what the
    tokenizer files of a resized fine-tune say about its vocabulary."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokens = spec.tokens
    specials = {tokens.image: "<|image_pad|>", tokens.video: "<|video_pad|>",
                tokens.vision_start: "<|vision_start|>", tokens.vision_end: "<|vision_end|>",
                tokens.bos: "<|endoftext|>", tokens.eos: "<|im_end|>"}
    im_start = next(i for i in range(spec.text.vocab - 1, -1, -1) if i not in specials)
    specials[im_start] = "<|im_start|>"
    vocab = {specials.get(i, f"w{i}"): i for i in range(spec.text.vocab)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=f"w{min(set(range(len(specials) + 1)) - set(specials))}"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=sorted(set(specials.values())))
    tokenizer.save_pretrained(directory)
