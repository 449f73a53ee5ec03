"""The routed experts of a mixture-of-experts MLP in Paddle, as the families whose MoE models store every expert's
weights in two stacked tensors (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`) share them: a router softmax,
top-k, renormalised, and the SwiGLU of each expert some token is routed to; resident, or streamed one expert's slices
at a time."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from vlhub.smoke.paddle_forward import OnDemand, as_float32, linear


class FusedExperts(nn.Layer):
    """`mlp.experts`: every expert's weights in two stacked tensors, as stored: gate_up_proj (gate the first Ie
    outputs, then up) and down_proj, each expert's [in, out] ([H, 2Ie] and [Ie, H]) or, `transposed`, [out, in]
    ([2Ie, H] and [H, Ie])."""

    def __init__(self, experts: int, hidden: int, inner: int, *, transposed: bool) -> None:
        super().__init__()
        gate_up, down = [2 * inner, hidden], [hidden, inner]
        if not transposed:
            gate_up, down = gate_up[::-1], down[::-1]
        self.gate_up_proj = self.create_parameter([experts, *gate_up])
        self.down_proj = self.create_parameter([experts, *down])

    def expert(self, index: int) -> tuple[paddle.Tensor, paddle.Tensor]:
        """Expert `index`'s gate_up and down weights."""
        return as_float32(self.gate_up_proj[index]), as_float32(self.down_proj[index])


class ExpertsOnDemand(OnDemand):
    """`mlp.experts` of a streamed layer: each expert's slices of the stacked tensors read when it is routed to."""

    def expert(self, index: int) -> tuple[paddle.Tensor, paddle.Tensor]:
        ids = np.array([index])
        return self.slices("gate_up_proj", ids)[0], self.slices("down_proj", ids)[0]


class RoutedExperts(nn.Layer):
    """`mlp` of an MoE layer: router softmax (float32) over the experts, top-k, renormalised; the SwiGLU of each
    expert some token is routed to, on those tokens, weighted and summed. The routing picks experts by value, so
    it runs in dygraph only; streamed (`on_demand`), one expert's slices are read at a time. `act` gates the
    experts (SiLU by default)."""

    def __init__(self, hidden: int, experts: int, top_k: int, inner: int, *, transposed: bool,
                 on_demand: bool = False, act: Callable[[paddle.Tensor], paddle.Tensor] = F.silu) -> None:
        super().__init__()
        self.top_k, self.inner, self.transposed, self.act = top_k, inner, transposed, act
        self.gate = linear(hidden, experts, bias=False)
        self.experts = ExpertsOnDemand() if on_demand else FusedExperts(experts, hidden, inner, transposed=transposed)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        probs = F.softmax(self.gate(x), axis=-1)
        weights, chosen = paddle.topk(probs, self.top_k, axis=-1)
        weights = (weights / weights.sum(axis=-1, keepdim=True)).numpy()
        chosen = chosen.numpy()
        out = paddle.zeros_like(x)
        for expert in np.unique(chosen):  # only the experts some token is routed to, one at a time
            tokens, rank = np.nonzero(chosen == expert)
            rows = paddle.to_tensor(tokens)
            gate_up, down = self.experts.expert(int(expert))
            fused = paddle.matmul(paddle.gather(x, rows), gate_up, transpose_y=self.transposed)
            hidden = self.act(fused[:, :self.inner]) * fused[:, self.inner:]
            scale = paddle.to_tensor(weights[tokens, rank][:, None])
            out = paddle.index_add(out, rows, 0, paddle.matmul(hidden, down, transpose_y=self.transposed) * scale)
        return out
