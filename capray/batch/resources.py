"""What the protect actors ask Ray for: what the config says, never what the cluster shows at submit time.

A KubeRay GPU worker group scales from zero, so at submit time the cluster has no GPU. Actors that then
asked for 0 GPUs would be packed several to a GPU node by the autoscaler, each seeing its CUDA device
anyway (CUDA out of memory, mass failures). So actors request `batch.gpus_per_actor` whenever it is
> 0, and the autoscaler starts GPU nodes for them. CPU clusters set it to 0 explicitly. The single
exception is the embedded local Ray (no address given) on a machine without CUDA: it runs the actors
on the CPU and says so once.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from capray.config import BatchConfig, CaprayConfig

log = logging.getLogger(__name__)


def actor_pool_args(b: BatchConfig) -> dict[str, Any]:
    """`map_batches` resource arguments for the protect actors."""
    return {"num_cpus": b.cpus_per_actor, "num_gpus": b.gpus_per_actor, "resources": b.actor_resources or None}


def embedded_cpu_fallback(cfg: CaprayConfig, address: str | None) -> CaprayConfig:
    """`cfg` with `batch.gpus_per_actor=0` (and the scoring actors' GPUs 0) for the embedded local Ray
    on a machine without CUDA."""
    scoring_gpus = cfg.sharding.gpus_per_actor if cfg.sharding.mode != "off" else 0
    if address or os.environ.get("RAY_ADDRESS") or cfg.batch.gpus_per_actor == scoring_gpus == 0:
        return cfg
    import torch

    if torch.cuda.is_available():
        return cfg
    log.warning("no CUDA device on this machine; the embedded local Ray runs the protect (and scoring) actors "
                "on the CPU (batch.gpus_per_actor=0, sharding.gpus_per_actor=0)")
    return cfg.model_copy(update={"batch": cfg.batch.model_copy(update={"gpus_per_actor": 0.0}),
                                  "sharding": cfg.sharding.model_copy(update={"gpus_per_actor": 0.0})})
