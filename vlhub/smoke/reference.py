"""The reference forward of the three families in numpy, computing in float32.

Framework-neutral on purpose: a smoke test compares a converted model in its runtime with this, so
it must need neither torch nor paddle. Weights come from `ModelWeights` one tensor at a time, at the
point of use, so a streamed forward holds one layer's weights plus activations.

Qwen2-VL / Qwen2.5-VL follow transformers' `modeling_qwen2_vl.py` / `modeling_qwen2_5_vl.py` (and
are tested equal to them); Qwen-VL follows the published `modeling_qwen.py` / `visual.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from vlhub.errors import UserError
from vlhub.keymaps.config import text_config, tie_word_embeddings
from vlhub.smoke.inputs import MASKED, SmokeInput
from vlhub.smoke.weights import ModelWeights

# lm_head rows per block: 16384 x 3584 float32 is 235 MB, however large the vocabulary
_HEAD_ROWS = 16384


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
    """Keys and values of every decoder layer for the tokens seen so far."""

    keys: list[np.ndarray] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)

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
    """One family's forward over `ModelWeights`: `encode_images`, then `logits` (with an optional cache)."""

    def __init__(self, weights: ModelWeights) -> None:
        self.weights = weights
        self.config = weights.config
        self.text = text_config(self.config)
        self.qwen_vl = weights.family == "qwen_vl"

    def w(self, name: str) -> np.ndarray:
        return self.weights.get(name)

    def wb(self, prefix: str) -> tuple[np.ndarray, np.ndarray | None]:
        bias = prefix + ".bias"
        return self.w(prefix + ".weight"), self.w(bias) if self.weights.has(bias) else None

    # -- vision

    def encode_images(self, smoke: SmokeInput) -> np.ndarray:
        """Image embeddings [image tokens, hidden], in the order the prompt's image positions take them."""
        return self._qwen_vl_vision(smoke.pixel_values) if self.qwen_vl else self._qwen2_vision(smoke)

    def _qwen2_vision(self, smoke: SmokeInput) -> np.ndarray:
        vision, cfg = smoke.vision, self.config["vision_config"]
        assert vision is not None
        qwen25 = self.weights.family == "qwen2_5_vl"
        width = cfg["hidden_size"] if qwen25 else cfg["embed_dim"]
        heads = cfg["num_heads"]
        unit = cfg.get("spatial_merge_size", 2) ** 2
        x = vision.pixel_values @ self.w("visual.patch_embed.proj.weight").reshape(width, -1).T
        cos, sin = vision_rotary(vision.position_ids, width // heads)
        if qwen25:
            order = vision.window_index

            def by_window(a: np.ndarray) -> np.ndarray:
                return a.reshape(-1, unit, a.shape[-1])[order].reshape(a.shape)

            x, cos, sin = by_window(x), by_window(cos), by_window(sin)
        full = set(cfg.get("fullatt_block_indexes", []))
        for block in range(cfg["depth"]):
            p = f"visual.blocks.{block}."
            mask = vision.full_mask if not qwen25 or block in full else vision.window_mask
            h = self._vision_norm(x, p + "norm1", qwen25)
            qkv = linear(h, *self.wb(p + "attn.qkv")).reshape(len(x), 3, heads, -1)
            q, k = apply_rotary(qkv[:, 0], cos, sin), apply_rotary(qkv[:, 1], cos, sin)
            x = x + linear(attention(q, k, qkv[:, 2], mask), *self.wb(p + "attn.proj"))
            h = self._vision_norm(x, p + "norm2", qwen25)
            if qwen25:
                act = silu(linear(h, *self.wb(p + "mlp.gate_proj"))) * linear(h, *self.wb(p + "mlp.up_proj"))
                x = x + linear(act, *self.wb(p + "mlp.down_proj"))
            else:
                x = x + linear(quick_gelu(linear(h, *self.wb(p + "mlp.fc1"))), *self.wb(p + "mlp.fc2"))
        h = self._vision_norm(x, "visual.merger.ln_q", qwen25).reshape(len(x) // unit, -1)
        out = linear(gelu(linear(h, *self.wb("visual.merger.mlp.0"))), *self.wb("visual.merger.mlp.2"))
        return out[vision.reverse_index] if qwen25 else out

    def _vision_norm(self, x: np.ndarray, prefix: str, rms: bool) -> np.ndarray:
        if rms:
            return rms_norm(x, self.w(prefix + ".weight"), 1e-6)
        return layer_norm(x, self.w(prefix + ".weight"), self.w(prefix + ".bias"))

    def _qwen_vl_vision(self, pixels: np.ndarray) -> np.ndarray:
        cfg = self.config["visual"]
        v = "transformer.visual."
        width, heads, patch = cfg["width"], cfg["heads"], cfg["patch_size"]
        conv = self.w(v + "conv1.weight").reshape(width, -1)
        _, channels, size, _ = pixels.shape
        side = size // patch
        patches = pixels[0].reshape(channels, side, patch, side, patch).transpose(1, 3, 0, 2, 4)
        x = patches.reshape(side * side, -1) @ conv.T
        x = x + resize_grid(self.w(v + "positional_embedding"), side * side)
        x = layer_norm(x, self.w(v + "ln_pre.weight"), self.w(v + "ln_pre.bias"))
        for block in range(cfg["layers"]):
            p = f"{v}transformer.resblocks.{block}."
            h = layer_norm(x, self.w(p + "ln_1.weight"), self.w(p + "ln_1.bias"))
            # the fused projection is grouped per head: (heads, [q; k; v] of head_dim each)
            qkv = linear(h, *self.wb(p + "attn.in_proj")).reshape(len(x), heads, 3, -1)
            x = x + linear(attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], None), *self.wb(p + "attn.out_proj"))
            h = layer_norm(x, self.w(p + "ln_2.weight"), self.w(p + "ln_2.bias"))
            x = x + linear(gelu(linear(h, *self.wb(p + "mlp.c_fc"))), *self.wb(p + "mlp.c_proj"))
        out = self._resampler(x)
        out = layer_norm(out, self.w(v + "ln_post.weight"), self.w(v + "ln_post.bias"))
        return out @ self.w(v + "proj")

    def _resampler(self, x: np.ndarray) -> np.ndarray:
        """Qwen-VL's attention pool: 256 learned queries attend over the patches (nn.MultiheadAttention)."""
        a = "transformer.visual.attn_pool."
        dim = self.config["visual"]["output_dim"]
        heads = dim // 128
        if self.weights.has(a + "kv_proj.weight"):
            x = linear(x, self.w(a + "kv_proj.weight"))
        kv = layer_norm(x, self.w(a + "ln_kv.weight"), self.w(a + "ln_kv.bias"))
        pos = self.w(a + "pos_embed")
        query = layer_norm(self.w(a + "query"), self.w(a + "ln_q.weight"), self.w(a + "ln_q.bias"))
        w_q, w_k, w_v = np.split(self.w(a + "attn.in_proj_weight"), 3)
        b_q, b_k, b_v = np.split(self.w(a + "attn.in_proj_bias"), 3)
        q = linear(query + pos, w_q, b_q).reshape(len(query), heads, -1)
        k = linear(kv + resize_grid(pos, len(kv)), w_k, b_k).reshape(len(kv), heads, -1)
        values = linear(kv, w_v, b_v).reshape(len(kv), heads, -1)
        return linear(attention(q, k, values, None), *self.wb(a + "attn.out_proj"))

    # -- text

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        table = "transformer.wte.weight" if self.qwen_vl else "model.embed_tokens.weight"
        return self.weights.rows(table, input_ids)

    def logits(self, input_ids: np.ndarray, position_ids: np.ndarray, image_embeds: np.ndarray | None = None,
               image_mask: np.ndarray | None = None, cache: KVCache | None = None) -> np.ndarray:
        """Logits [L, vocab] for new tokens (their positions, shaped [3, L] or [L]) after `cache`'s."""
        x = self.embed(input_ids)
        if image_embeds is not None and image_mask is not None and image_mask.any():
            x[image_mask] = image_embeds
        cache = cache if cache is not None else KVCache()
        if self.qwen_vl:
            limit = self.text.get("seq_length", 2048)
            if cache.length + len(input_ids) > limit:
                raise UserError(f"the reference runs Qwen-VL up to seq_length {limit} tokens, where dynamic NTK "
                                "and logn scaling are identities")
        cos, sin = self._text_rotary(position_ids)
        mask = causal_mask(len(input_ids), cache.length)
        for layer in range(self.text["num_hidden_layers"]):
            x = self._qwen_vl_layer(x, layer, cos, sin, mask, cache) if self.qwen_vl else \
                self._qwen2_layer(x, layer, cos, sin, mask, cache)
        if self.qwen_vl:
            x = rms_norm(x, self.w("transformer.ln_f.weight"), self.text["layer_norm_epsilon"])
        else:
            x = rms_norm(x, self.w("model.norm.weight"), self.text["rms_norm_eps"])
        return self._lm_head(x)

    def _text_rotary(self, position_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = self.text
        if self.qwen_vl:
            dim = int(t["kv_channels"] * t.get("rotary_pct", 1.0))
            inv_freq = inverse_frequencies(dim, float(t.get("rotary_emb_base", 10000)))
            return rotary_tables(position_ids[:, None].astype(np.float32) * inv_freq)
        dim = t["hidden_size"] // t["num_attention_heads"]
        inv_freq = inverse_frequencies(dim, float(t.get("rope_theta", 1000000.0)))
        sections = (t.get("rope_scaling") or {}).get("mrope_section", [16, 24, 24])
        angles = position_ids[..., None].astype(np.float32) * inv_freq  # [3, L, d/2]
        bounds = np.cumsum([0, *sections])
        chosen = [angles[i % 3, :, bounds[i]:bounds[i + 1]] for i in range(len(sections))]
        return rotary_tables(np.concatenate(chosen, axis=-1))

    def _qwen2_layer(self, x: np.ndarray, layer: int, cos: np.ndarray, sin: np.ndarray, mask: np.ndarray,
                     cache: KVCache) -> np.ndarray:
        t = self.text
        p = f"model.layers.{layer}."
        heads, kv_heads = t["num_attention_heads"], t["num_key_value_heads"]
        h = rms_norm(x, self.w(p + "input_layernorm.weight"), t["rms_norm_eps"])
        q = linear(h, *self.wb(p + "self_attn.q_proj")).reshape(len(x), heads, -1)
        k = linear(h, *self.wb(p + "self_attn.k_proj")).reshape(len(x), kv_heads, -1)
        v = linear(h, *self.wb(p + "self_attn.v_proj")).reshape(len(x), kv_heads, -1)
        keys, values = cache.extend(layer, apply_rotary(k, cos, sin), v)
        x = x + linear(attention(apply_rotary(q, cos, sin), keys, values, mask), self.w(p + "self_attn.o_proj.weight"))
        h = rms_norm(x, self.w(p + "post_attention_layernorm.weight"), t["rms_norm_eps"])
        act = silu(linear(h, self.w(p + "mlp.gate_proj.weight"))) * linear(h, self.w(p + "mlp.up_proj.weight"))
        return x + linear(act, self.w(p + "mlp.down_proj.weight"))

    def _qwen_vl_layer(self, x: np.ndarray, layer: int, cos: np.ndarray, sin: np.ndarray, mask: np.ndarray,
                       cache: KVCache) -> np.ndarray:
        t = self.text
        p = f"transformer.h.{layer}."
        heads = t["num_attention_heads"]
        h = rms_norm(x, self.w(p + "ln_1.weight"), t["layer_norm_epsilon"])
        q, k, v = (a.reshape(len(x), heads, -1) for a in np.split(linear(h, *self.wb(p + "attn.c_attn")), 3, axis=-1))
        keys, values = cache.extend(layer, apply_rotary(k, cos, sin), v)
        x = x + linear(attention(apply_rotary(q, cos, sin), keys, values, mask), self.w(p + "attn.c_proj.weight"))
        h = rms_norm(x, self.w(p + "ln_2.weight"), t["layer_norm_epsilon"])
        act = linear(h, self.w(p + "mlp.w1.weight")) * silu(linear(h, self.w(p + "mlp.w2.weight")))
        return x + linear(act, self.w(p + "mlp.c_proj.weight"))

    def _lm_head(self, x: np.ndarray) -> np.ndarray:
        if self.qwen_vl:
            head = "lm_head.weight"
        else:
            head = "model.embed_tokens.weight" if tie_word_embeddings(self.config) else "lm_head.weight"
        vocab = self.text["vocab_size"]
        out = np.empty((len(x), vocab), dtype=np.float32)
        for start, block in self.weights.row_blocks(head, _HEAD_ROWS):
            out[:, start:start + len(block)] = x @ block.T
        return out

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
