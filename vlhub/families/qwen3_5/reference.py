"""Qwen3.5's reference forward, dense and MoE (transformers' `modeling_qwen3_5.py` and `modeling_qwen3_5_moe.py`;
docs/facts/qwen3.md, "Text, Qwen3.5").

Vision (`model.visual.*`): Qwen3-VL's tower without DeepStack: 16-pixel patches projected by the Conv3d (a matmul,
with its bias), plus the learned position table resampled to the grid (the input's four taps per patch); LayerNorm
blocks attending within each frame, rotated by the 2-D (row, column) rotary, with an MLP `linear_fc2(act(linear_fc1))`;
the merger (LayerNorm over each patch, then 2x2 groups, fc1, exact GELU, fc2): `vlhub/smoke/reference.py`'s
`TableVisionForward`, shared with Qwen3-VL (as are `interleaved_mrope` and `routed_experts`).

Text (`model.language_model.*`): decoder layers of two kinds, as `text_config.layer_types` lists them. Every norm but
the linear-attention output's scales by `1 + w` (`Qwen3_5RMSNorm`, weights stored zero-centred).
- Full attention (`self_attn`): q_proj gives each head's query and output gate ([q_h | gate_h]); per-head `1 + w`
  RMSNorm on q and k; the rotary turns only the first `head_dim * partial_rotary_factor` dims, by interleaved
  multimodal positions; `o_proj(attention * sigmoid(gate))`.
- Linear attention (`linear_attn`, Gated DeltaNet): q | k | v projected together through a causal depthwise
  convolution (kernel K: the state is the last K - 1 inputs) and `hidden_act` (SiLU in the releases); q and k L2-normalised (q also by 1/sqrt(dk)),
  repeated to the value heads; beta = sigmoid(b), decay g = -exp(A_log) * softplus(a + dt_bias); per token and value
  head the state S [dk, dv] decays by exp(g), takes beta * (v - S^T k) along k, and gives S^T q
  (`torch_recurrent_gated_delta_rule`, which transformers' chunked form equals); then a plain `w` RMSNorm per value
  head times silu(z), and out_proj.
MLP: `down(act(gate) * up)`, act `hidden_act`; in the MoE every layer routes: softmax (float32) over the experts, top-k, renormalised, SwiGLU experts
from the fused tensors ([E, gate | up, H], [E, H, Ie]), plus a shared expert scaled by sigmoid(shared_expert_gate).
"""

from __future__ import annotations

import reprlib
from collections.abc import Callable
from functools import cached_property

import numpy as np

from vlhub.errors import UserError
from vlhub.smoke.reference import (
    VISION_ACTIVATIONS,
    KVCache,
    TableVisionForward,
    apply_rotary,
    attention,
    interleaved_mrope,
    rms_norm,
    silu,
)

# transformers' defaults for what a config.json may leave out (`configuration_qwen3_5.py`: rope_parameters falls back
# to theta 10000 and a quarter of the head rotated; `Qwen3_5TextRotaryEmbedding`'s sections)
DEFAULT_MROPE_SECTION = (11, 11, 10)
DEFAULT_ROPE_THETA = 10000.0
DEFAULT_PARTIAL_ROTARY = 0.25
L2_EPS = np.float32(1e-6)  # transformers' l2norm of q and k (FLA's)


def softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(np.float32(0), x)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt((x * x).sum(axis=-1, keepdims=True) + L2_EPS)


def rope_settings(config: dict) -> dict:
    """The rotary settings of a config.json as written, flat or nested: transformers 5's
    `text_config.rope_parameters` (`rope_theta` inside) or 4.57's `rope_scaling` beside `rope_theta`. (The flat
    view vlhub reads other fields from keeps only the sections, not the partial rotary factor.)"""
    text = {**config, **(config.get("text_config") or {})}
    theta = {"rope_theta": text["rope_theta"]} if "rope_theta" in text else {}
    found = next((value for key in ("rope_parameters", "rope_scaling") if isinstance(value := text.get(key), dict)), {})
    return {**theta, **found}


def rotary_width(head_dim: int, rope: dict) -> int:
    """How many of a head's dims the rotary turns (`partial_rotary_factor` of them, a quarter by default); a factor
    outside (0, 1] or an odd width is refused in one line."""
    factor = rope.get("partial_rotary_factor", DEFAULT_PARTIAL_ROTARY)
    width = int(head_dim * factor) if isinstance(factor, (int, float)) and 0 < factor <= 1 else 0
    if width < 2 or width % 2:
        raise UserError(f"config.json rope_parameters.partial_rotary_factor is {reprlib.repr(factor)}: a Qwen3.5 "
                        f"checkpoint needs a number in (0, 1] that turns an even number of the {head_dim} head dims")
    return width


def causal_conv(x: np.ndarray, weight: np.ndarray, past: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A depthwise causal convolution: x [L, C] after the `past` K - 1 inputs [K - 1, C], weight [C, 1, K]. The
    outputs [L, C] and the new state (the last K - 1 inputs)."""
    kernel = weight.shape[-1]
    padded = np.concatenate([past, x])
    taps = weight[:, 0, :].T  # [K, C]: tap j multiplies the input K - 1 - j steps back
    out = sum(padded[j:j + len(x)] * taps[j] for j in range(kernel))
    return out, padded[len(padded) - (kernel - 1):]


def gated_delta_rule(q: np.ndarray, k: np.ndarray, v: np.ndarray, g: np.ndarray, beta: np.ndarray,
                     state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The recurrence, token by token: q, k [L, heads, dk], v [L, heads, dv], g and beta [L, heads], state
    [heads, dk, dv]. The outputs [L, heads, dv] and the state after the last token."""
    out = np.empty_like(v)
    decay = np.exp(g)
    for t in range(len(q)):
        state = state * decay[t][:, None, None]
        remembered = np.einsum("hkv,hk->hv", state, k[t])
        delta = (v[t] - remembered) * beta[t][:, None]
        state = state + k[t][:, :, None] * delta[:, None, :]
        out[t] = np.einsum("hkv,hk->hv", state, q[t])
    return out, state


class Reference(TableVisionForward):
    deepstack = False

    # -- text

    @cached_property
    def _dims(self) -> dict[str, object]:
        """The key map's dims of this config (which layers are full attention, the linear-attention heads)."""
        return self.weights.plan.keymap.resolve_dims(self.weights.checkpoint.config or self.config)

    def head_dim(self) -> int:
        return int(self._dims["head_dim"])  # type: ignore[call-overload]

    def lm_head(self) -> str:
        # transformers ties by the top-level tie_word_embeddings (absent: not tied)
        return self.embedding if self._dims["tied"] else "lm_head.weight"

    @cached_property
    def _rope(self) -> dict:
        return rope_settings(self.weights.checkpoint.config or self.config)

    @cached_property
    def _rotary_dim(self) -> int:
        return rotary_width(self.head_dim(), self._rope)

    def text_rotary(self, position_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Interleaved M-RoPE over the rotated part of the head (`Qwen3_5TextRotaryEmbedding`): of its d_rot/2
        frequency slots, slot s turns by the height position if s % 3 == 1 and s < 3 * sections[1], by the width
        position if s % 3 == 2 and s < 3 * sections[2], else by the time position. Tables [L, d_rot]."""
        rope = self._rope
        return interleaved_mrope(position_ids, self._rotary_dim, float(rope.get("rope_theta", DEFAULT_ROPE_THETA)),
                                 rope.get("mrope_section", DEFAULT_MROPE_SECTION))

    def rms_eps(self) -> float:
        return float(self._dims["eps"])  # type: ignore[arg-type]

    @cached_property
    def _act(self) -> Callable[[np.ndarray], np.ndarray]:
        """`text_config.hidden_act` (the key map admits only the names the table has): transformers applies it
        after the linear-attention convolution and in the MLP."""
        return VISION_ACTIVATIONS[str(self._dims["act"])]

    def norm(self, x: np.ndarray, name: str) -> np.ndarray:
        """A zero-centred RMSNorm: x / rms(x) * (1 + w)."""
        return rms_norm(x, 1 + self.w(name), self.rms_eps())

    def final_norm(self, x: np.ndarray) -> np.ndarray:
        return self.norm(x, self.text_prefix + "norm.weight")

    def layer(self, x: np.ndarray, layer: int, cos: np.ndarray, sin: np.ndarray, mask: np.ndarray,
              cache: KVCache) -> np.ndarray:
        p = f"{self.text_prefix}layers.{layer}."
        h = self.norm(x, p + "input_layernorm.weight")
        full = self._dims["full_layers"]
        if layer in full:  # type: ignore[operator]
            x = x + self._attention(h, p + "self_attn.", full.index(layer), cos, sin, mask, cache)  # type: ignore
        else:
            x = x + self._linear_attention(h, p + "linear_attn.", layer, cache)
        return x + self.mlp(self.norm(x, p + "post_attention_layernorm.weight"), layer, p)

    def _attention(self, h: np.ndarray, p: str, slot: int, cos: np.ndarray, sin: np.ndarray, mask: np.ndarray,
                   cache: KVCache) -> np.ndarray:
        """Gated full attention; its keys and values are the cache's `slot`-th (the full-attention layers' order,
        so the cache's length is the tokens seen)."""
        t, dim, rot = self.text, self.head_dim(), self._rotary_dim
        heads, kv_heads = t["num_attention_heads"], t["num_key_value_heads"]
        q_gate = self.dense(h, p + "q_proj", bias=False).reshape(len(h), heads, 2 * dim)
        q, gate = q_gate[..., :dim], q_gate[..., dim:].reshape(len(h), heads * dim)
        q = self.norm(q, p + "q_norm.weight")
        k = self.norm(self.dense(h, p + "k_proj", bias=False).reshape(len(h), kv_heads, dim), p + "k_norm.weight")
        v = self.dense(h, p + "v_proj", bias=False).reshape(len(h), kv_heads, dim)

        def rotated(a: np.ndarray) -> np.ndarray:
            return np.concatenate([apply_rotary(a[..., :rot], cos, sin), a[..., rot:]], axis=-1)

        keys, values = cache.extend(slot, rotated(k), v)
        out = attention(rotated(q), keys, values, mask) * sigmoid(gate)
        return self.dense(out, p + "o_proj", bias=False)

    def _linear_attention(self, h: np.ndarray, p: str, layer: int, cache: KVCache) -> np.ndarray:
        """A Gated DeltaNet layer over new tokens `h`, continuing from (and updating) its state in `cache`: the last
        K - 1 convolution inputs and the recurrent state [value heads, dk, dv]."""
        d = self._dims
        nk, nv, dk, dv = (int(d[key])  # type: ignore[call-overload]
                          for key in ("lin_k_heads", "lin_v_heads", "lin_k_dim", "lin_v_dim"))
        conv_weight = self.w(p + "conv1d.weight")
        past_inputs, state = cache.states.get(layer) or (
            np.zeros((conv_weight.shape[-1] - 1, conv_weight.shape[0]), np.float32), np.zeros((nv, dk, dv), np.float32))
        mixed, past_inputs = causal_conv(self.dense(h, p + "in_proj_qkv", bias=False), conv_weight, past_inputs)
        mixed = self._act(mixed)
        q = mixed[:, :nk * dk].reshape(len(h), nk, dk)
        k = mixed[:, nk * dk:2 * nk * dk].reshape(len(h), nk, dk)
        v = mixed[:, 2 * nk * dk:].reshape(len(h), nv, dv)
        q = np.repeat(l2_normalize(q), nv // nk, axis=1) * np.float32(dk ** -0.5)
        k = np.repeat(l2_normalize(k), nv // nk, axis=1)
        beta = sigmoid(self.dense(h, p + "in_proj_b", bias=False))
        g = -np.exp(self.w(p + "A_log")) * softplus(self.dense(h, p + "in_proj_a", bias=False) + self.w(p + "dt_bias"))
        out, state = gated_delta_rule(q, k, v, g, beta, state)
        cache.states[layer] = (past_inputs, state)
        z = self.dense(h, p + "in_proj_z", bias=False).reshape(len(h), nv, dv)
        out = rms_norm(out, self.w(p + "norm.weight"), self.rms_eps()) * silu(z)  # silu here whatever hidden_act
        return self.dense(out.reshape(len(h), nv * dv), p + "out_proj", bias=False)

    # -- MoE

    def mlp(self, h: np.ndarray, layer: int, prefix: str) -> np.ndarray:
        m = prefix + "mlp."
        if not self._dims["moe"]:
            return self._swiglu(h, m)
        # Qwen3_5MoeTopKRouter always renormalises; the experts stored [E, gate | up, H] and [E, H, Ie]
        out = self.routed_experts(h, m, int(self._dims["experts_per_token"]),  # type: ignore[call-overload]
                                  transposed=True, act=self._act)
        shared = self._swiglu(h, m + "shared_expert.")
        return out + sigmoid(self.dense(h, m + "shared_expert_gate", bias=False)) * shared

    def _swiglu(self, h: np.ndarray, prefix: str) -> np.ndarray:
        gate = self._act(self.dense(h, prefix + "gate_proj", bias=False))
        return self.dense(gate * self.dense(h, prefix + "up_proj", bias=False), prefix + "down_proj", bias=False)
