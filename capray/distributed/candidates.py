"""Shard the λ-candidate evaluations of one PGD step across Ray actors.

The search (capray.attack.cap) only sees the `CandidateEvaluator` interface, so sharding changes where
candidates are scored, not which λ wins: each `CandidateWorker` holds its own copy of the models, gets
the phase's surrogate weights and prompt embedding once per PGD phase (through the object store), and
scores a contiguous slice of the candidates under the step's common random draw. Use it when one
group's latency matters more than throughput (the online path); bulk jobs are better served by one
group per GPU actor, which keeps every GPU busy without cross-actor traffic.

    workers = [CandidateWorker.options(num_gpus=1).remote(cfg.model.model_dump_json()) for _ in range(4)]
    protect_group(images, cfg, models=models, evaluator_factory=sharded_evaluator_factory(workers))
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, Callable

import numpy as np
import ray
import torch

from capray.attack.cap import EvaluationContext, InProcessEvaluator
from capray.attack.randomness import NoiseDraw

_PHASES = itertools.count()


@ray.remote
class CandidateWorker:
    """A scoring actor: SD parts resident, the current phase's UNet weights loaded on demand."""

    def __init__(self, model_config_json: str, batch_size: int = 8):
        from capray.attack.engine import load_models
        from capray.config import ModelConfig

        self.models = load_models(ModelConfig.model_validate_json(model_config_json))
        self.batch_size = batch_size
        self.unet: Any = None
        self.phase: tuple | None = None

    def load_phase(self, phase: tuple, state: dict[str, torch.Tensor], cond: torch.Tensor, layout: Any,
                   resolution: int) -> None:
        if self.phase == phase:
            return
        parts = self.models.parts
        dtype = next(iter(state.values())).dtype
        if self.unet is None or next(self.unet.parameters()).dtype != dtype:
            self.unet = copy.deepcopy(parts.unet).to(dtype)
        self.unet.load_state_dict(state)
        self.cond, self.layout, self.resolution = cond.to(parts.device), layout, resolution
        self.phase = phase

    def score(self, candidates: np.ndarray, draw: NoiseDraw) -> np.ndarray:
        from capray.attack.losses import reconstruction_loss
        from capray.attack.surrogate import autocast_for

        parts = self.models.parts

        def image_loss(images: torch.Tensor, rows: NoiseDraw) -> torch.Tensor:
            with autocast_for(parts):
                return reconstruction_loss(parts, self.unet, self.cond, images, rows)

        evaluator = InProcessEvaluator(image_loss, self.layout, self.resolution, self.batch_size * self.layout.n)
        return evaluator(torch.from_numpy(candidates).to(parts.device), draw).cpu().numpy()


class ShardedEvaluator:
    """Scores (M, P) candidates on `workers`, one contiguous shard each, in r order."""

    def __init__(self, workers: list[Any], context: EvaluationContext):
        if not workers:
            raise ValueError("ShardedEvaluator needs at least one CandidateWorker")
        self.workers = workers
        state = {k: v.detach().cpu() for k, v in context.unet.state_dict().items()}
        phase = (id(self), next(_PHASES))
        state_ref = ray.put(state)  # one copy in the object store, read by every worker
        ray.get([w.load_phase.remote(phase, state_ref, context.cond.detach().cpu(), context.layout,
                                     context.resolution) for w in workers])

    def __call__(self, candidates: torch.Tensor, draw: NoiseDraw) -> torch.Tensor:
        shards = np.array_split(candidates.detach().cpu().numpy(), len(self.workers))
        refs = [w.score.remote(shard, draw) for w, shard in zip(self.workers, shards) if len(shard)]
        scores = np.concatenate(ray.get(refs))
        return torch.from_numpy(scores).to(candidates.device)


def sharded_evaluator_factory(workers: list[Any]) -> Callable[..., ShardedEvaluator]:
    """An `evaluator_factory` for `protect_group` that scores candidates on `workers`."""

    def factory(*, loss_fn: Any, n_images: int, batch_size: int, context: EvaluationContext) -> ShardedEvaluator:
        return ShardedEvaluator(workers, context)

    return factory
