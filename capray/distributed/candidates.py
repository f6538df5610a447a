"""Score one PGD step's λ candidates on borrowed scoring actors as well as in the group runner.

The search (capray.attack.cap) only sees the `CandidateEvaluator` interface, so sharding changes where
candidates are scored, not which λ wins. `PooledEvaluator` (one per PGD phase) cuts each scoring call
into contiguous shards in r order, cut only between the local evaluator's image chunks: the runner
scores the first shard itself, borrowed `CandidateWorker`s score the rest under the same common random
draw. What travels is the step's lazy `CandidateSet` (the four flat group vectors, put in the object
store once per step and fetched by a peer once per step, whatever the number of calls), each call's
ratios and each peer's (start, stop), not M built candidates: a peer builds its chunks' photos itself.
Every image is scored by the same code (`InProcessEvaluator`), on the same weights, in the same chunk
as local scoring would put it, so sharded == local bit for bit. (On a CPU, kernels' last bits also
depend on the thread setup: give the runner and the scoring actors the same one, as Ray does for equal
`num_cpus`, or pin `sharding.torch_threads`. On a GPU only the device model matters.) A call that is
one chunk (M·N ≤ `cap.score_image_batch_size`) is not split (by default a call holds all of a step's
candidates).

Peer state: the phase's UNet weights and prompt embedding go into the object store once per phase,
the first time a peer is used; a peer fetches them only on a cache miss, keyed by (group, phase),
keeps `sharding.cache_phases` of them, and drops the phase's when the phase (and so the group) ends.

Faults: a shard whose actor dies or does not answer within `sharding.shard_timeout_s` is re-scored in
the runner (same candidates, same draw: same scores), and the pool replaces the actor.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import uuid
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import ray
import torch

from capray.attack.cap import Candidates, CandidateSet, EvaluationContext, InProcessEvaluator, as_candidates
from capray.attack.randomness import NoiseDraw

log = logging.getLogger(__name__)


@dataclass
class PhaseState:
    """What a peer needs to score one phase's candidates; travels once per (group, phase)."""

    unet_state: dict[str, torch.Tensor]
    cond: torch.Tensor
    layout: Any
    resolution: int

    @classmethod
    def of(cls, context: EvaluationContext) -> PhaseState:
        return cls({k: v.detach().cpu() for k, v in context.unet.state_dict().items()},
                   context.cond.detach().cpu(), context.layout, context.resolution)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.unet_state.values())


class ScoringActor:
    """A scoring actor's body: SD parts resident, a few phases' UNets cached by (group, phase)."""

    def __init__(self, model_config_json: str, torch_threads: int | None = None, cache_phases: int = 2):
        from capray.attack.engine import load_models
        from capray.config import ModelConfig

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.models = load_models(ModelConfig.model_validate_json(model_config_json))
        self.cache_phases = cache_phases
        self.phases: OrderedDict[str, tuple[Any, torch.Tensor, Any, int]] = OrderedDict()
        self.fetches = 0  # phase states fetched from the object store (cache misses)
        self.vectors: tuple[str, Candidates] | None = None  # (step token, the step's candidate vectors)
        self.vector_fetches = 0

    def fetch_counts(self) -> dict[str, int]:
        return {"phases": self.fetches, "vectors": self.vector_fetches}

    def ready(self) -> int:
        return os.getpid()

    def cached(self) -> list[str]:
        return list(self.phases)

    def drop(self, key: str) -> None:
        self.phases.pop(key, None)

    def _phase(self, key: str, box: list[Any]) -> tuple[Any, torch.Tensor, Any, int]:
        if key in self.phases:
            self.phases.move_to_end(key)
            return self.phases[key]
        state: PhaseState = ray.get(box[0])  # boxed, so only a miss fetches the weights
        self.fetches += 1
        parts = self.models.parts
        dtype = next(iter(state.unet_state.values())).dtype
        if len(self.phases) >= self.cache_phases:  # reuse the oldest phase's UNet memory
            unet = self.phases.popitem(last=False)[1][0]
        else:
            unet = copy.deepcopy(parts.unet)
        unet = unet.to(dtype)
        unet.load_state_dict(state.unet_state)
        entry = (unet, state.cond.to(parts.device), state.layout, state.resolution)
        self.phases[key] = entry
        return entry

    def _vectors(self, token: str, box: list[Any]) -> Candidates:
        """The step's candidate vectors on this device, fetched once per step (boxed: only a miss fetches)."""
        if self.vectors is None or self.vectors[0] != token:
            self.vectors = None  # the previous step's, freed before the next arrives
            self.vectors = (token, ray.get(box[0]).to(self.models.parts.device))
            self.vector_fetches += 1
        return self.vectors[1]

    def score(self, key: str, box: list[Any], token: str, vectors_box: list[Any], ratios: tuple[int, ...] | None,
              start: int, stop: int, draw: NoiseDraw, image_batch_size: int) -> np.ndarray:
        """Scores candidates start..stop-1 of the call's candidates (each built here, chunk by chunk): the
        step's vectors (`token`) with this call's `ratios` (None: the vectors are whole rows)."""
        from capray.attack.losses import reconstruction_loss
        from capray.attack.surrogate import autocast_for

        unet, cond, layout, resolution = self._phase(key, box)
        parts = self.models.parts
        vectors = self._vectors(token, vectors_box)
        candidates = vectors if ratios is None else replace(vectors, ratios=tuple(ratios))

        def image_loss(images: torch.Tensor, rows: NoiseDraw) -> torch.Tensor:
            with autocast_for(parts):
                return reconstruction_loss(parts, unet, cond, images, rows)

        evaluator = InProcessEvaluator(image_loss, layout, resolution, image_batch_size)
        return evaluator(candidates.shard(start, stop), draw).cpu().numpy()


CandidateWorker = ray.remote(max_restarts=0, max_task_retries=0)(ScoringActor)

_SCORING_FAILURES = (ray.exceptions.RayError, ray.exceptions.GetTimeoutError)


def _cancel(ref: Any) -> None:
    try:
        ray.cancel(ref)  # a hung shard must not keep its actor busy for the next borrower
    except Exception:  # noqa: BLE001 - the actor is gone already
        pass


class PooledEvaluator:
    """A `CandidateEvaluator` for one PGD phase: the runner's own shard plus borrowed peers' shards."""

    def __init__(self, pool: Any, context: EvaluationContext, local: InProcessEvaluator, image_batch_size: int,
                 shard_timeout_s: float):
        self.pool, self.context, self.local = pool, context, local
        self.image_batch_size, self.shard_timeout_s = image_batch_size, shard_timeout_s
        self.key = f"{uuid.uuid4().hex[:12]}"  # (group, phase): one evaluator per phase of one group
        self.state_ref: Any = None
        self.state_bytes = 0
        self.used: dict[int, Any] = {}  # peers that may hold this phase's state
        self.remote_candidates = 0
        self.rescored = 0  # shards re-scored here after their actor failed
        self._shipped: tuple[tuple[Any, ...], str, list[Any]] | None = None  # (the step's vectors, token, ref)
        self.vector_puts = 0  # steps whose vectors went into the object store

    def _state_box(self) -> list[Any]:
        if self.state_ref is None:  # once per phase, and only if a peer is ever used
            state = PhaseState.of(self.context)
            self.state_bytes = state.nbytes
            self.state_ref = ray.put(state)
        return [self.state_ref]

    def _vectors_box(self, candidates: Candidates) -> tuple[str, list[Any], tuple[int, ...] | None]:
        """(token, boxed ref, ratios) of a call's candidates: the four vectors go into the object store
        once per step (every call of a step, e.g. `cap.score_draws` draws or `independent` scoring, shares
        them); a call adds only its ratios. Whole rows (`StackedCandidates`) travel with every call."""
        if not isinstance(candidates, CandidateSet):
            return uuid.uuid4().hex, [ray.put(candidates.to("cpu"))], None
        tensors = (candidates.x, candidates.x0, candidates.grad_re, candidates.grad_cons)
        if self._shipped is None or any(a is not b for a, b in zip(self._shipped[0], tensors)):
            self._shipped = None  # the previous step's vectors may go
            vectors = replace(candidates, ratios=()).to("cpu")
            self._shipped = (tensors, uuid.uuid4().hex, [ray.put(vectors)])
            self.vector_puts += 1
        _, token, box = self._shipped
        return token, box, candidates.ratios

    @property
    def unit(self) -> int:
        """Candidates per shard unit: whole scoring chunks of the local evaluator (lcm of N and the chunk)."""
        n = self.context.layout.n
        return math.lcm(n, self.image_batch_size) // n

    def shards(self, m: int, parts: int) -> list[tuple[int, int]]:
        """(start, stop) of `parts` contiguous shards of m candidates, cut only at chunk boundaries.

        Every image is then scored in the very chunk (same companions, same shapes) local scoring puts
        it in, so a peer's scores are the local scores bit for bit, not just up to rounding.
        """
        units = np.array_split(np.arange(math.ceil(m / self.unit)), parts)
        return [(int(u[0]) * self.unit, min(m, (int(u[-1]) + 1) * self.unit)) for u in units if len(u)]

    def __call__(self, candidates: Candidates | torch.Tensor, draw: NoiseDraw) -> torch.Tensor:
        candidates = as_candidates(candidates)
        m = candidates.m
        units = math.ceil(m / self.unit)
        lease, peers = self.pool.borrow(units - 1) if units >= 2 else (None, [])
        if not peers:
            return self.local(candidates, draw)
        dead: list[int] = []
        pending: list[tuple[int, Candidates, Any]] = []  # (peer id, shard, ref), in shard order
        outstanding: set[Any] = set()  # refs neither answered nor cancelled yet
        try:
            cuts = self.shards(m, len(peers) + 1)
            shards = [candidates.shard(a, b) for a, b in cuts]
            box, cpu_draw = self._state_box(), draw.cpu()
            token, vectors_box, ratios = self._vectors_box(candidates)
            for (pid, peer), shard, (a, b) in zip(peers, shards[1:], cuts[1:]):
                ref = peer.score.remote(self.key, box, token, vectors_box, ratios, a, b, cpu_draw,
                                        self.image_batch_size)
                pending.append((pid, shard, ref))
                outstanding.add(ref)
            self.used.update(peers)
            scores = [self.local(shards[0], draw)]
            # one deadline for all peers' shards together, not shard_timeout_s for each in turn
            refs = [ref for _, _, ref in pending]
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=self.shard_timeout_s)
            done_set = set(done)
            for pid, shard, ref in pending:
                try:
                    if ref not in done_set:
                        raise ray.exceptions.GetTimeoutError(f"no answer within {self.shard_timeout_s} s")
                    outstanding.discard(ref)
                    scores.append(torch.from_numpy(ray.get(ref)).to(scores[0].device))
                    self.remote_candidates += shard.m
                except _SCORING_FAILURES as exc:
                    log.warning("scoring actor %s failed (%s); re-scoring its %d candidate(s) locally",
                                pid, type(exc).__name__, shard.m)
                    dead.append(pid)
                    self.used.pop(pid, None)
                    _cancel(ref)
                    outstanding.discard(ref)
                    scores.append(self.local(shard, draw))
                    self.rescored += 1
            return torch.cat(scores)
        finally:  # also when scoring here raised (e.g. out of memory): peers stop, the lease ends
            for ref in outstanding:
                _cancel(ref)
            self.pool.give_back(lease, dead)

    def close(self) -> None:
        """The phase ended: peers drop its state, the object store frees it."""
        for peer in self.used.values():
            peer.drop.remote(self.key)
        self.used.clear()
        self.state_ref = None
        self._shipped = None


def pooled_evaluator_factory(pool: Any, sharding: Any):
    """An `evaluator_factory` for `protect_group`: candidates scored here and on `pool`'s borrowed actors."""

    def factory(*, loss_fn: Any, n_images: int, batch_size: int, context: EvaluationContext) -> PooledEvaluator:
        local = InProcessEvaluator(loss_fn, context.layout, context.resolution, batch_size)
        return PooledEvaluator(pool, context, local, batch_size, sharding.shard_timeout_s)

    return factory


def evaluator_factory_for(sharding: Any, pool: Any):
    """What a front door passes to the engine: None (score locally) when sharding is off or there is no pool."""
    if sharding.mode == "off" or pool is None:
        return None
    return pooled_evaluator_factory(pool, sharding)
