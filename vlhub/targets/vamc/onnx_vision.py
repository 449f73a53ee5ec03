"""The vision tower and merger as VastAI's vamc takes them, exported to ONNX: what the vamc smoke test runs in
onnxruntime at the layout's N, to check the numbers the vacc form implies (vamc compiles its own export of the
vendor's modeling)."""

from __future__ import annotations

import math
from pathlib import Path

from vlhub.deploy.onnx_graph import F32, MASK_VALUE, Graph, Progress, Store, Writer, vision_tower, vision_width
from vlhub.sizes import config_family
from vlhub.smoke.weights import ModelWeights

STEM = "vision_transformer"  # the file's name, as the vendor's export_onnx.py names it


def export_vacc_vision(weights: ModelWeights, out: Path, patches: int, on_bytes: Progress | None = None) -> Path:
    """The vision tower and merger in `out/vision_transformer.onnx`:

        pixel_values [N,1176], attention_mask [1,N,N] (1 attend, 0 not), cos, sin [N, head_dim]
        (window attention: also window_attention_mask [1,N,N], for the blocks outside fullatt_block_indexes)
        -> image_embeds [N/4, hidden]

    The names are the vendor's, not llm_convert's full_attn_mask: VastModelZOO's visual yamls' frontend.shape
    and vlm/qwen2_vl/build_in/source_code/export_onnx.py's input_names are pixel_values, attention_mask, cos,
    sin. The window mask is vlhub's: the vendor's windowed vision forward (vlm/qwen2_5_vl's
    modeling_qwen2_5_vl_vacc.py) passes one attention_mask to every block, and its yaml lists
    fullatt_block_indexes for vamc, which applies them in a way that is not public.

    Patches padded to N rows; the host builds cos/sin (`vision_rotary`) and the block-diagonal masks and, for
    window attention, orders patches by window and the output back."""
    shapes = {step.target.name: step.target.shape for step in weights.plan.steps}
    out.mkdir(parents=True, exist_ok=True)
    writer = Writer(weights, shapes, out, on_bytes or (lambda _size: None), flat=True)
    with writer.group(".", STEM, [n for n in shapes if n.startswith("visual.")]) as store:
        writer.save(_vacc_vision(store, weights.config, patches), ".", STEM)
    return out / f"{STEM}.onnx"


def _vacc_vision(store: Store, config: dict, patches: int) -> Graph:
    windows = config_family(config).vision.window_attention
    width, heads = vision_width(config)
    patch_values = math.prod(store.shapes["visual.patch_embed.proj.weight"][1:])
    g = Graph("vit", store)
    pixels = g.input("pixel_values", F32, [patches, patch_values])
    # vacc masks say 1 (attend) or 0, as the boolean mask its SDPA takes: made additive here
    masks = [g.op("Mul", g.op("Sub", g.input(name, F32, [1, patches, patches]), g.const(1.0)), g.const(-MASK_VALUE))
             for name in ("attention_mask", "window_attention_mask")[: 1 + windows]]
    cos, sin = (g.input(name, F32, [patches, width // heads]) for name in ("cos", "sin"))
    # the host puts the tokens back in image order, so the output is in window order
    vision_tower(g, config, patches, pixels, cos, sin, masks[0], masks[-1], out="image_embeds")
    unit = config["vision_config"].get("spatial_merge_size", 2) ** 2
    g.output("image_embeds", F32, [patches // unit, store.shapes["visual.merger.mlp.2.weight"][0]])
    return g
