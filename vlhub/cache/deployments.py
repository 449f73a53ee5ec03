"""The `vlhub convert --to` targets that write deployment layouts, by name."""

from __future__ import annotations

from vlhub.cache import paddle_inference, tpu_mlir, vamc
from vlhub.cache.layout import Deployment

DEPLOYMENTS: dict[str, Deployment] = {d.name: d for d in (paddle_inference.DEPLOYMENT, tpu_mlir.DEPLOYMENT,
                                                           vamc.DEPLOYMENT)}
