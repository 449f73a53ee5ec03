"""Qwen3-VL, dense (`qwen3_vl`) and mixture-of-experts (`qwen3_vl_moe`): a ViT of 16-pixel patches with a learned,
resampled position table and deepstack mergers feeding the first decoder layers, and a Qwen3 decoder (q/k norms,
interleaved multimodal rotary; routed experts in the MoE)."""
