"""Qwen3.5, dense (`qwen3_5`) and mixture-of-experts (`qwen3_5_moe`): Qwen3-VL's vision tower without DeepStack,
and a hybrid decoder of three Gated DeltaNet linear-attention layers to one gated full-attention layer (partial,
interleaved multimodal rotary; `1 + w` RMSNorms; routed experts plus a gated shared expert in the MoE)."""
