"""The `vlhub convert --to` targets that write deployment layouts, by name."""

from __future__ import annotations

from vlhub.targets.base import Deployment
from vlhub.targets.paddle_inference import build as paddle_inference
from vlhub.targets.tpu_mlir import build as tpu_mlir
from vlhub.targets.vamc import build as vamc

DEPLOYMENTS: dict[str, Deployment] = {d.name: d for d in (paddle_inference.DEPLOYMENT, tpu_mlir.DEPLOYMENT,
                                                           vamc.DEPLOYMENT)}
