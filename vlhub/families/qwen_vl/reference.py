"""Qwen-VL's reference forward (the published remote code `modeling_qwen.py` / `visual.py`): a ViT over a fixed
square image with a bicubic-resized position table, an attention pool of 256 learned queries, and QWen decoder
layers (fused `c_attn`, rotary over `rotary_pct` of each head, SwiGLU as `w1 * silu(w2)`)."""

from __future__ import annotations

import numpy as np

from vlhub.errors import UserError
from vlhub.smoke.inputs import SmokeInput
from vlhub.smoke.reference import (
    KVCache,
    ReferenceForward,
    apply_rotary,
    attention,
    gelu,
    inverse_frequencies,
    layer_norm,
    linear,
    resize_grid,
    rms_norm,
    rotary_tables,
    silu,
)

POOL_HEAD_DIM = 128  # the attention pool's heads are output_dim / 128 wide


class Reference(ReferenceForward):
    embedding = "transformer.wte.weight"

    def encode_images(self, smoke: SmokeInput) -> np.ndarray:
        pixels = smoke.pixel_values
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
            qkv = self.dense(h, p + "attn.in_proj").reshape(len(x), heads, 3, -1)
            x = x + self.dense(attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], None), p + "attn.out_proj")
            h = layer_norm(x, self.w(p + "ln_2.weight"), self.w(p + "ln_2.bias"))
            x = x + self.dense(gelu(self.dense(h, p + "mlp.c_fc")), p + "mlp.c_proj")
        out = self._resampler(x)
        out = layer_norm(out, self.w(v + "ln_post.weight"), self.w(v + "ln_post.bias"))
        return out @ self.w(v + "proj")

    def _resampler(self, x: np.ndarray) -> np.ndarray:
        """The attention pool: 256 learned queries attend over the patches (nn.MultiheadAttention)."""
        a = "transformer.visual.attn_pool."
        heads = self.config["visual"]["output_dim"] // POOL_HEAD_DIM
        if self.weights.has(a + "kv_proj.weight"):
            x = self.dense(x, a + "kv_proj", bias=False)
        kv = layer_norm(x, self.w(a + "ln_kv.weight"), self.w(a + "ln_kv.bias"))
        pos = self.w(a + "pos_embed")
        query = layer_norm(self.w(a + "query"), self.w(a + "ln_q.weight"), self.w(a + "ln_q.bias"))
        w_q, w_k, w_v = np.split(self.w(a + "attn.in_proj_weight"), 3)
        b_q, b_k, b_v = np.split(self.w(a + "attn.in_proj_bias"), 3)
        q = linear(query + pos, w_q, b_q).reshape(len(query), heads, -1)
        k = linear(kv + resize_grid(pos, len(kv)), w_k, b_k).reshape(len(kv), heads, -1)
        values = linear(kv, w_v, b_v).reshape(len(kv), heads, -1)
        return self.dense(attention(q, k, values, None), a + "attn.out_proj")

    def check_length(self, total: int) -> None:
        limit = self.text.get("seq_length", 2048)
        if total > limit:
            raise UserError(f"the reference runs Qwen-VL up to seq_length {limit} tokens, where dynamic NTK "
                            "and logn scaling are identities")

    def text_rotary(self, position_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = self.text
        dim = int(t["kv_channels"] * t.get("rotary_pct", 1.0))
        inv_freq = inverse_frequencies(dim, float(t.get("rotary_emb_base", 10000)))
        return rotary_tables(position_ids[:, None].astype(np.float32) * inv_freq)

    def layer(self, x: np.ndarray, layer: int, cos: np.ndarray, sin: np.ndarray, mask: np.ndarray,
              cache: KVCache) -> np.ndarray:
        t = self.text
        p = f"transformer.h.{layer}."
        heads = t["num_attention_heads"]
        h = rms_norm(x, self.w(p + "ln_1.weight"), t["layer_norm_epsilon"])
        q, k, v = (a.reshape(len(x), heads, -1) for a in np.split(self.dense(h, p + "attn.c_attn"), 3, axis=-1))
        keys, values = cache.extend(layer, apply_rotary(k, cos, sin), v)
        x = x + self.dense(attention(apply_rotary(q, cos, sin), keys, values, mask), p + "attn.c_proj", bias=False)
        h = rms_norm(x, self.w(p + "ln_2.weight"), t["layer_norm_epsilon"])
        act = self.dense(h, p + "mlp.w1", bias=False) * silu(self.dense(h, p + "mlp.w2", bias=False))
        return x + self.dense(act, p + "mlp.c_proj", bias=False)

    def final_norm(self, x: np.ndarray) -> np.ndarray:
        return rms_norm(x, self.w("transformer.ln_f.weight"), self.text["layer_norm_epsilon"])

    def lm_head(self) -> str:
        return "lm_head.weight"
