"""The reference forward in numpy, computing in float32: the ops, the generation loop every family shares, and
the building blocks several families assemble (a multimodal-rotary decoder, merged-patch vision towers). Each
family's own forward is `vlhub/families/<family>/reference.py`; `ReferenceForward(weights)` gives it.

Framework-neutral on purpose: a smoke test compares a converted model in its runtime with this, so
it must need neither torch nor paddle. Weights come from `ModelWeights` one tensor at a time, at the
point of use, so a streamed forward holds one layer's weights plus activations. Each family's forward
follows transformers' (or the published remote code's) modeling file and is tested equal to it.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from vlhub.errors import UserError
from vlhub.family_registry import FAMILIES
from vlhub.keymaps.config import text_config, tie_word_embeddings
from vlhub.smoke.inputs import MASKED, SmokeInput, VisionInputs
from vlhub.smoke.weights import ModelWeights

# ---------------------------------------------------------------------------------------------- ops

def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    out = x @ weight.T
    return out + bias if bias is not None else out


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)) * weight


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    centred = x - x.mean(axis=-1, keepdims=True)
    return centred / np.sqrt(np.mean(centred * centred, axis=-1, keepdims=True) + np.float32(eps)) * weight + bias


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def quick_gelu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(np.float32(-1.702) * x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU's tanh approximation (torch's approximate="tanh", transformers' `gelu_pytorch_tanh`)."""
    inner = np.float32(math.sqrt(2 / math.pi)) * (x + np.float32(0.044715) * x * x * x)
    return np.float32(0.5) * x * (1 + np.tanh(inner))


def erf(x: np.ndarray) -> np.ndarray:
    """erf to within 1.2e-7 everywhere (Numerical Recipes' erfc Chebyshev fit), numpy having none."""
    z = np.abs(x).astype(np.float64)
    t = 1 / (1 + 0.5 * z)
    poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))))
    return (np.sign(x) * (1 - t * np.exp(poly))).astype(np.float32)


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, torch's default."""
    return np.float32(0.5) * x * (1 + erf(x * np.float32(1 / math.sqrt(2))))


# a vision MLP's activation by config.json `hidden_act` (transformers' ACT2FN names)
VISION_ACTIVATIONS = {"gelu_pytorch_tanh": gelu_tanh, "gelu_new": gelu_tanh, "gelu": gelu, "quick_gelu": quick_gelu,
                      "silu": silu}


def softmax(scores: np.ndarray) -> np.ndarray:
    scores = scores - scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    return scores / scores.sum(axis=-1, keepdims=True)


def rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Scaled dot-product attention. q [Lq, heads, d], k/v [Lk, kv_heads, d] (kv heads repeated
    to the query heads), mask additive [Lq, Lk] or None. Returns [Lq, heads * d]."""
    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[2]
    if kv_heads != heads:
        k = np.repeat(k, heads // kv_heads, axis=1)
        v = np.repeat(v, heads // kv_heads, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) * np.float32(1 / math.sqrt(dim))
    if mask is not None:
        scores += mask
    return np.einsum("hqk,khd->qhd", softmax(scores), v).reshape(q.shape[0], heads * dim)


def causal_mask(new: int, past: int) -> np.ndarray:
    """Query i (absolute past + i) sees keys 0 .. past + i."""
    keys = np.arange(past + new)
    return np.where(keys[None, :] <= (past + np.arange(new))[:, None], 0, MASKED).astype(np.float32)


def rotary_tables(angles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of rotate-half angles [..., d/2], duplicated to [..., d]."""
    emb = np.concatenate([angles, angles], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def apply_rotary(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [L, heads, d] rotated by per-position tables [L, d]."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


def vision_rotary(position_ids: np.ndarray, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The vision tower's cos and sin [N, head_dim] for patch (row, column) ids [N, 2]: a quarter of the
    frequencies each for row and column, the halves repeated."""
    angles = position_ids[..., None] * inverse_frequencies(head_dim // 2, 10000.0)  # [N, 2, head_dim/4]
    return rotary_tables(angles.reshape(len(angles), -1))


def interleaved_mrope(position_ids: np.ndarray, dim: int, theta: float,
                      sections: tuple[int, ...] | list[int]) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [L, dim] of interleaved multimodal rotary positions [3, L] (or [L], text only): of the dim/2
    frequency slots, slot s turns by the height position if s % 3 == 1 and s < 3 * sections[1], by the width
    position if s % 3 == 2 and s < 3 * sections[2], else by the time position; the slots repeat for the second
    half."""
    inv_freq = inverse_frequencies(dim, theta)
    positions = np.broadcast_to(position_ids, (3, position_ids.shape[-1]))
    angles = positions[..., None].astype(np.float32) * inv_freq  # [3, L, dim/2]
    slot = np.arange(len(inv_freq))
    axis = np.zeros(len(inv_freq), dtype=np.int64)
    axis[(slot % 3 == 1) & (slot < 3 * sections[1])] = 1
    axis[(slot % 3 == 2) & (slot < 3 * sections[2])] = 2
    return rotary_tables(angles[axis, :, slot].T)


def inverse_frequencies(dim: int, base: float) -> np.ndarray:
    return (1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)


def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[out, in] weights of torch's bicubic resize along one axis (align_corners=False, A=-0.75)."""
    a = -0.75
    matrix = np.zeros((size_out, size_in), dtype=np.float64)
    scale = size_in / size_out
    for i in range(size_out):
        source = (i + 0.5) * scale - 0.5
        base = math.floor(source)
        t = source - base
        for offset, distance in zip(range(-1, 3), (1 + t, t, 1 - t, 2 - t)):
            d = abs(distance)
            weight = ((a + 2) * d - (a + 3)) * d * d + 1 if d <= 1 else ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
            matrix[i, min(max(base + offset, 0), size_in - 1)] += weight
    return matrix.astype(np.float32)


def resize_grid(table: np.ndarray, tokens: int) -> np.ndarray:
    """A [side^2, C] table of positions on a square grid, bicubic-resized to `tokens` positions."""
    side_in, side_out = math.isqrt(table.shape[0]), math.isqrt(tokens)
    if side_in == side_out:
        return table
    resize = bicubic_matrix(side_in, side_out)
    grid = table.reshape(side_in, side_in, -1)
    return np.einsum("oi,ijc,pj->opc", resize, grid, resize).reshape(tokens, -1).astype(np.float32)


# ---------------------------------------------------------------------------------------- forward

@dataclass
class KVCache:
    """Keys and values of every decoder layer for the tokens seen so far (and, by layer, the recurrent state of a
    layer that keeps one instead: a linear-attention layer's)."""

    keys: list[np.ndarray] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)
    states: dict[int, tuple[np.ndarray, ...]] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    def extend(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if layer == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer] = np.concatenate([self.keys[layer], k])
            self.values[layer] = np.concatenate([self.values[layer], v])
        return self.keys[layer], self.values[layer]


class ReferenceForward:
    """A family's forward over `ModelWeights`: `encode_images`, then `logits` (with an optional cache), and
    greedy `generate`. `ReferenceForward(weights)` gives the forward of the weights' family (as `Path` gives a
    `PosixPath`): the class `Reference` of `vlhub/families/<family>/reference.py`, which fills in the hooks."""

    embedding = ""  # the official name of the token embedding table

    def __new__(cls, weights: ModelWeights) -> ReferenceForward:
        if cls is ReferenceForward:
            cls = FAMILIES[weights.family].code("reference").Reference
        return super().__new__(cls)

    def __init__(self, weights: ModelWeights) -> None:
        self.weights = weights
        self.config = weights.config
        self.text = text_config(self.config)

    def w(self, name: str) -> np.ndarray:
        return self.weights.get(name)

    def wb(self, prefix: str) -> tuple[np.ndarray, np.ndarray | None]:
        bias = prefix + ".bias"
        return self.w(prefix + ".weight"), self.w(bias) if self.weights.has(bias) else None

    def dense(self, x: np.ndarray, prefix: str, *, bias: bool = True) -> np.ndarray:
        """The Linear `prefix` (`.weight`, and `.bias` where the checkpoint has one and `bias`) applied to x, its
        weight decoded block by block as it is multiplied (`ModelWeights.linear`)."""
        out = self.weights.linear(x, prefix + ".weight")
        return out + self.w(prefix + ".bias") if bias and self.weights.has(prefix + ".bias") else out

    # -- what each family supplies

    def encode_images(self, smoke: SmokeInput) -> np.ndarray:
        """Image embeddings [image tokens, hidden], in the order the prompt's image positions take them."""
        raise NotImplementedError

    def text_rotary(self, position_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin [L, head_dim] of the text positions."""
        raise NotImplementedError

    def layer(self, x: np.ndarray, layer: int, cos: np.ndarray, sin: np.ndarray, mask: np.ndarray,
              cache: KVCache) -> np.ndarray:
        """One decoder layer over new tokens `x`, extending `cache` with their keys and values."""
        raise NotImplementedError

    def final_norm(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def lm_head(self) -> str:
        """The official name of the output projection (the embedding when the model ties them)."""
        raise NotImplementedError

    def check_length(self, total: int) -> None:
        """Refuse a sequence the forward would not compute as the model does (nothing by default)."""

    # -- text

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self.weights.rows(self.embedding, input_ids)

    def logits(self, input_ids: np.ndarray, position_ids: np.ndarray, image_embeds: np.ndarray | None = None,
               image_mask: np.ndarray | None = None, cache: KVCache | None = None) -> np.ndarray:
        """Logits [L, vocab] for new tokens (their positions, shaped [3, L] or [L]) after `cache`'s.

        `image_embeds` [image tokens, hidden] replace the embeddings where `image_mask` is set. A family whose
        vision tower also feeds early decoder layers (DeepStack) gives [1 + k, image tokens, hidden]: the first
        replaces the embeddings, feature j is added to the output of decoder layer j at the same positions."""
        x = self.embed(input_ids)
        layer_features = None
        if image_embeds is not None and image_mask is not None and image_mask.any():
            if image_embeds.ndim == 3:
                image_embeds, layer_features = image_embeds[0], image_embeds[1:]
            x[image_mask] = image_embeds
        cache = cache if cache is not None else KVCache()
        self.check_length(cache.length + len(input_ids))
        cos, sin = self.text_rotary(position_ids)
        mask = causal_mask(len(input_ids), cache.length)
        for layer in range(self.text["num_hidden_layers"]):
            x = self.layer(x, layer, cos, sin, mask, cache)
            if layer_features is not None and layer < len(layer_features):
                x[image_mask] += layer_features[layer]
        return self._project(self.final_norm(x))

    def _project(self, x: np.ndarray) -> np.ndarray:
        return self.weights.linear(x, self.lm_head())

    # -- generation

    def generate(self, smoke: SmokeInput, image_embeds: np.ndarray, tokens: int,
                 on_token: Callable[[str], None] | None = None) -> tuple[np.ndarray, list[int], np.ndarray]:
        """Greedy decoding: the prompt's logits [L, vocab], `tokens` generated ids, and the logits
        [tokens, vocab] each was chosen from."""
        cache = KVCache()
        prompt_logits = self.logits(smoke.input_ids, smoke.position_ids, image_embeds, smoke.image_mask, cache)
        chosen_from = [prompt_logits[-1]]
        generated = [int(prompt_logits[-1].argmax())]
        for step in range(1, tokens):
            if on_token:
                on_token(f"reference: token {step + 1} of {tokens}")
            positions = smoke.positions_after(step)[..., -1:]
            step_logits = self.logits(np.array(generated[-1:], dtype=np.int64), positions, cache=cache)
            chosen_from.append(step_logits[-1])
            generated.append(int(step_logits[-1].argmax()))
        return prompt_logits, generated, np.stack(chosen_from)


class MRopeDecoderForward(ReferenceForward):
    """A text model of pre-norm decoder layers (`model.layers.N.*`): grouped-query attention with biased q, k and
    v projections, rotated by multimodal rotary positions whose frequency slots split into (time, height, width)
    sections (`rope_scaling.mrope_section`), a SwiGLU MLP, RMSNorm; lm_head tied to the embedding or not.

    Hooks for a family built the same way with a few differences: `text_prefix` (where the text model's tensors
    are), `head_dim`, `qk_norm` (what q and k go through before the rotary), `mlp` (the feed-forward block)."""

    text_prefix = "model."
    embedding = "model.embed_tokens.weight"

    def head_dim(self) -> int:
        return self.text["hidden_size"] // self.text["num_attention_heads"]

    def rms_eps(self) -> float:
        """The RMSNorms' epsilon: config.json's `rms_norm_eps` (transformers saves it in every release)."""
        return float(self.text["rms_norm_eps"])

    def qk_norm(self, q: np.ndarray, k: np.ndarray, prefix: str) -> tuple[np.ndarray, np.ndarray]:
        """q [L, heads, d] and k [L, kv heads, d] as the rotary takes them (as they are by default)."""
        return q, k

    def mlp(self, h: np.ndarray, layer: int, prefix: str) -> np.ndarray:
        """The feed-forward block of decoder layer `layer` (tensors under `prefix`) on normed `h`: SwiGLU."""
        gate = silu(self.dense(h, prefix + "mlp.gate_proj", bias=False))
        return self.dense(gate * self.dense(h, prefix + "mlp.up_proj", bias=False), prefix + "mlp.down_proj", bias=False)

    def text_rotary(self, position_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = self.text
        dim = self.head_dim()
        inv_freq = inverse_frequencies(dim, float(t.get("rope_theta", 1000000.0)))
        sections = (t.get("rope_scaling") or {}).get("mrope_section", [16, 24, 24])
        angles = position_ids[..., None].astype(np.float32) * inv_freq  # [3, L, d/2]
        bounds = np.cumsum([0, *sections])
        chosen = [angles[i % 3, :, bounds[i]:bounds[i + 1]] for i in range(len(sections))]
        return rotary_tables(np.concatenate(chosen, axis=-1))

    def layer(self, x: np.ndarray, layer: int, cos: np.ndarray, sin: np.ndarray, mask: np.ndarray,
              cache: KVCache) -> np.ndarray:
        t = self.text
        p = f"{self.text_prefix}layers.{layer}."
        heads, kv_heads = t["num_attention_heads"], t["num_key_value_heads"]
        h = rms_norm(x, self.w(p + "input_layernorm.weight"), self.rms_eps())
        q = self.dense(h, p + "self_attn.q_proj").reshape(len(x), heads, -1)
        k = self.dense(h, p + "self_attn.k_proj").reshape(len(x), kv_heads, -1)
        v = self.dense(h, p + "self_attn.v_proj").reshape(len(x), kv_heads, -1)
        q, k = self.qk_norm(q, k, p)
        keys, values = cache.extend(layer, apply_rotary(k, cos, sin), v)
        x = x + self.dense(attention(apply_rotary(q, cos, sin), keys, values, mask), p + "self_attn.o_proj",
                           bias=False)
        h = rms_norm(x, self.w(p + "post_attention_layernorm.weight"), self.rms_eps())
        return x + self.mlp(h, layer, p)

    def routed_experts(self, h: np.ndarray, prefix: str, top_k: int, *, transposed: bool,
                       act: Callable[[np.ndarray], np.ndarray] = silu) -> np.ndarray:
        """A mixture's routed experts on normed `h` (tensors under `prefix`, e.g. `...layers.N.mlp.`): router
        softmax (float32) over the experts (`gate`), top-k, renormalised; the SwiGLU of each expert some token is
        routed to, from the fused tensors `experts.gate_up_proj` (gate the first Ie outputs, then up) and
        `experts.down_proj`, each expert's [in, out] or, `transposed`, [out, in], `act` (SiLU by default) on the
        gate; only the experts some token is
        routed to are computed, each read on its own."""
        probs = softmax(self.dense(h, prefix + "gate", bias=False).astype(np.float32))  # [L, experts]
        chosen = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]  # [L, k], highest first
        weights = np.take_along_axis(probs, chosen, axis=-1)
        weights /= weights.sum(axis=-1, keepdims=True)
        out = np.zeros_like(h)
        for expert in np.unique(chosen):
            tokens, rank = np.nonzero(chosen == expert)
            gate_up = self.weights.entry(prefix + "experts.gate_up_proj", int(expert))
            fused = h[tokens] @ (gate_up.T if transposed else gate_up)  # [tokens, 2Ie]
            inner = fused.shape[1] // 2
            hidden = act(fused[:, :inner]) * fused[:, inner:]
            down = self.weights.entry(prefix + "experts.down_proj", int(expert))
            out[tokens] += (hidden @ (down.T if transposed else down)) * weights[tokens, rank, None]
        return out

    def final_norm(self, x: np.ndarray) -> np.ndarray:
        return rms_norm(x, self.w(self.text_prefix + "norm.weight"), self.rms_eps())

    def lm_head(self) -> str:
        return self.embedding if tie_word_embeddings(self.config) else "lm_head.weight"

    def merged_patches(self, vision: VisionInputs, *, width: int, norm: Callable[[np.ndarray, str], np.ndarray],
                       mlp: Callable[[np.ndarray, str], np.ndarray], full_blocks: set[int] | None) -> np.ndarray:
        """The vision tower of merged 14-pixel patches (`visual.*`): the patch projection, blocks of attention
        rotated by 2-D (row, column) positions and an MLP, then the merger of each 2x2 group. `norm` and `mlp`
        are the family's; `full_blocks` None means every block attends across the whole image, else the others
        attend within windows (`vision.window_*`: the patches in window order, put back after the merger)."""
        cfg = self.config["vision_config"]
        heads, unit = cfg["num_heads"], cfg.get("spatial_merge_size", 2) ** 2
        x = vision.pixel_values @ self.w("visual.patch_embed.proj.weight").reshape(width, -1).T
        cos, sin = vision_rotary(vision.position_ids, width // heads)
        windowed = full_blocks is not None
        if windowed:
            def by_window(a: np.ndarray) -> np.ndarray:
                return a.reshape(-1, unit, a.shape[-1])[vision.window_index].reshape(a.shape)

            x, cos, sin = by_window(x), by_window(cos), by_window(sin)
        for block in range(cfg["depth"]):
            mask = vision.window_mask if windowed and block not in full_blocks else vision.full_mask
            x = self.vision_block(x, f"visual.blocks.{block}.", heads, cos, sin, mask, norm=norm, mlp=mlp)
        h = norm(x, "visual.merger.ln_q").reshape(len(x) // unit, -1)
        out = self.dense(gelu(self.dense(h, "visual.merger.mlp.0")), "visual.merger.mlp.2")
        return out[vision.reverse_index] if windowed else out

    def vision_block(self, x: np.ndarray, prefix: str, heads: int, cos: np.ndarray, sin: np.ndarray,
                     mask: np.ndarray | None, *, norm: Callable[[np.ndarray, str], np.ndarray],
                     mlp: Callable[[np.ndarray, str], np.ndarray]) -> np.ndarray:
        """One pre-norm block of a merged-patch tower (`norm1`, `attn.qkv` with q, k, v rows, `attn.proj`, `norm2`,
        `mlp.`): attention rotated by the 2-D (row, column) tables `cos`, `sin` within `mask`, then the MLP."""
        qkv = self.dense(norm(x, prefix + "norm1"), prefix + "attn.qkv").reshape(len(x), 3, heads, -1)
        q, k = apply_rotary(qkv[:, 0], cos, sin), apply_rotary(qkv[:, 1], cos, sin)
        x = x + self.dense(attention(q, k, qkv[:, 2], mask), prefix + "attn.proj")
        return x + mlp(norm(x, prefix + "norm2"), prefix + "mlp.")


class TableVisionForward(MRopeDecoderForward):
    """A model under `model.visual.*` (a vision tower of merged patches with a learned position table, and
    DeepStack mergers where `deepstack`) and `model.language_model.*` (a decoder the family's hooks shape)."""

    text_prefix = "model.language_model."
    embedding = "model.language_model.embed_tokens.weight"
    vision_prefix = "model.visual."
    deepstack = False  # whether the tower has DeepStack mergers (`deepstack_visual_indexes`)

    def encode_images(self, smoke: SmokeInput) -> np.ndarray:
        """The vision tower of merged 16-pixel patches with a learned position table (`model.visual.*`): the
        Conv3d projection (a matmul, with its bias) plus the table resampled to the grid (the input's four taps per
        patch); LayerNorm blocks attending within each frame, rotated by the 2-D (row, column) rotary, with an MLP
        `linear_fc2(act(linear_fc1))` (`hidden_act`); the merger (LayerNorm over each patch, then 2x2 groups, fc1,
        exact GELU, fc2). Without `deepstack`: [image tokens, out]. With it, after
        each block in `deepstack_visual_indexes` a merger of its own (LayerNorm after the grouping) gives a feature,
        stacked after the main merger's output: [1 + features, image tokens, out]."""
        vision, prefix, deepstack = smoke.vision, self.vision_prefix, self.deepstack
        assert vision is not None and vision.interp_indices is not None and vision.interp_weights is not None
        cfg = self.config["vision_config"]
        width, heads = cfg["hidden_size"], cfg["num_heads"]
        act = cfg.get("hidden_act", "gelu_pytorch_tanh")
        if not isinstance(act, str) or act not in VISION_ACTIVATIONS:
            raise UserError(f"config.json vision_config.hidden_act is {reprlib.repr(act)}; the reference knows "
                            f"{', '.join(VISION_ACTIVATIONS)}")
        weight, bias = self.wb(prefix + "patch_embed.proj")
        x = linear(vision.pixel_values, weight.reshape(width, -1), bias)
        table = self.w(prefix + "pos_embed.weight")
        x = x + np.einsum("nk,nkc->nc", vision.interp_weights, table[vision.interp_indices])
        # theta 10000: transformers' vision rope default, which no released config.json changes
        cos, sin = vision_rotary(vision.position_ids, width // heads)
        unit = cfg.get("spatial_merge_size", 2) ** 2

        def norm(h: np.ndarray, name: str) -> np.ndarray:
            return layer_norm(h, self.w(name + ".weight"), self.w(name + ".bias"))

        def mlp(h: np.ndarray, name: str) -> np.ndarray:
            return self.dense(VISION_ACTIVATIONS[act](self.dense(h, name + "linear_fc1")), name + "linear_fc2")

        def merger(h: np.ndarray, name: str, *, after_grouping: bool) -> np.ndarray:
            group = h.shape[-1] * unit
            h = norm(h.reshape(-1, group), name + "norm") if after_grouping else \
                norm(h, name + "norm").reshape(-1, group)
            return self.dense(gelu(self.dense(h, name + "linear_fc1")), name + "linear_fc2")

        listed = list(cfg.get("deepstack_visual_indexes") or []) if deepstack else []
        features = []
        for block in range(cfg["depth"]):
            x = self.vision_block(x, f"{prefix}blocks.{block}.", heads, cos, sin, vision.full_mask, norm=norm, mlp=mlp)
            if block in listed:  # in block order, each by its first place in the list, as transformers does
                features.append(merger(x, f"{prefix}deepstack_merger_list.{listed.index(block)}.",
                                       after_grouping=True))
        main = merger(x, prefix + "merger.", after_grouping=False)
        return np.stack([main, *features]) if deepstack else main
