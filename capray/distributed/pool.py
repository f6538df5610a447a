"""The scoring-actor pool that group runners borrow from, and the runner's side of it.

Topology (docs/sharding.md): the job driver (`capray protect`) or the Serve app owns one
`ScoringPool`, which owns `sharding.actors` `CandidateWorker`s. Group runners (the batch job's protect
actors, Serve's Protector replicas) call `borrow` before a scoring call and `give_back` after it.
Nothing ever waits on the pool:

* `borrow` answers at once with whatever it may lend *now* ('auto': ready actors nobody holds;
  'always': every ready actor, shared), possibly nothing; the runner then scores alone.
* scoring actors call nothing, so no cycle of waits can form with Ray Data's actor pool, Serve's
  replicas or the autoscaler; an actor still starting (a GPU node scaling up) is simply not lent.
* a lease not given back (its runner died) is reclaimed after `2 · shard_timeout_s`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)


class ScoringPool:
    """Lends scoring actors to group runners; replaces the ones that die (a bounded number of times)."""

    def __init__(self, model_config_json: str, sharding_json: str, worker_cls: Any = None):
        from capray.config import ShardingConfig
        from capray.distributed.candidates import CandidateWorker

        self.sharding = ShardingConfig.model_validate_json(sharding_json)
        self.model_config_json = model_config_json
        self.worker_cls = worker_cls or CandidateWorker
        self.workers: dict[int, Any] = {}
        self.starting: dict[Any, int] = {}  # ready() ref → worker id
        self.ready: list[int] = []
        self.leases: dict[str, tuple[list[int], float]] = {}
        self.held: set[int] = set()
        self.next_id = 0
        self.replacements_left = 2 * self.sharding.actors
        self.lent = 0  # actor-loans made, for stats
        # Serve runs sync deployment methods in a thread pool, concurrently: every method that touches
        # the pool's state holds this lock (re-entrant: _refresh → give_back → _retire → _start).
        self._lock = threading.RLock()
        for _ in range(self.sharding.actors):
            self._start()

    def _start(self) -> None:
        s = self.sharding
        with self._lock:
            worker = self.worker_cls.options(num_cpus=s.cpus_per_actor, num_gpus=s.gpus_per_actor).remote(
                self.model_config_json, s.torch_threads, s.cache_phases)
            self.workers[self.next_id] = worker
            self.starting[worker.ready.remote()] = self.next_id
            self.next_id += 1

    def _refresh(self) -> None:
        import ray

        with self._lock:
            if self.starting:
                done, _ = ray.wait(list(self.starting), num_returns=len(self.starting), timeout=0)
                for ref in done:
                    wid = self.starting.pop(ref)
                    try:
                        ray.get(ref)
                        self.ready.append(wid)
                    except Exception as exc:  # noqa: BLE001 - a worker that cannot load its models is not replaced
                        log.warning("scoring actor %s failed to start: %s", wid, exc)
                        self.workers.pop(wid, None)
            stale = time.monotonic() - 2 * self.sharding.shard_timeout_s
            for lease, (_ids, since) in list(self.leases.items()):
                if since < stale:  # its runner is gone
                    self.give_back(lease, [])

    def borrow(self, want: int) -> tuple[str | None, list[tuple[int, Any]]]:
        """Up to `want` actors to score on now; never waits. ('auto': idle ones, held until given back.)"""
        with self._lock:
            self._refresh()
            if want <= 0:
                return None, []
            if self.sharding.mode == "always":
                ids = self.ready[:want]
                self.lent += len(ids)
                return None, [(i, self.workers[i]) for i in ids]
            ids = [i for i in self.ready if i not in self.held][:want]
            if not ids:
                return None, []
            lease = uuid.uuid4().hex[:12]
            self.leases[lease] = (ids, time.monotonic())
            self.held.update(ids)
            self.lent += len(ids)
            return lease, [(i, self.workers[i]) for i in ids]

    def give_back(self, lease: str | None, dead: list[int]) -> None:
        """End a loan; `dead`: actors that failed a shard (killed and replaced)."""
        with self._lock:
            ids, _ = self.leases.pop(lease, ([], 0.0)) if lease else ([], 0.0)
            self.held.difference_update(ids)
            for wid in dead:
                self._retire(wid)

    def _retire(self, wid: int) -> None:
        import ray

        with self._lock:
            worker = self.workers.pop(wid, None)
            if worker is None:
                return
            self.ready = [i for i in self.ready if i != wid]
            self.held.discard(wid)
            with contextlib.suppress(Exception):
                ray.kill(worker)
            if self.replacements_left > 0:
                self.replacements_left -= 1
                self._start()

    def stats(self) -> dict[str, int]:
        with self._lock:
            self._refresh()
            return {"ready": len(self.ready), "starting": len(self.starting), "held": len(self.held),
                    "lent": self.lent}

    def shutdown(self) -> None:
        import ray

        with self._lock:
            for worker in list(self.workers.values()):
                with contextlib.suppress(Exception):
                    ray.kill(worker)
            self.workers.clear()


class PoolClient:
    """The runner's side: `resolve` turns a remote call's answer into its value (Ray ref or Serve response).

    A pool that does not answer quickly lends nothing: the runner scores alone and the group goes on.
    """

    def __init__(self, handle: Any, resolve: Callable[[Any], Any], timeout_s: float = 10.0):
        self.handle, self.resolve, self.timeout_s = handle, resolve, timeout_s

    @classmethod
    def for_actor(cls, name: str) -> PoolClient | None:
        import ray

        try:
            handle = ray.get_actor(name)
        except ValueError as exc:
            log.warning("scoring pool %s not found (%s); scoring locally", name, exc)
            return None
        return cls(handle, lambda ref: ray.get(ref, timeout=10.0))

    @classmethod
    def for_serve(cls, handle: Any) -> PoolClient:
        return cls(handle, lambda response: response.result(timeout_s=10.0))

    def borrow(self, want: int) -> tuple[str | None, list[tuple[int, Any]]]:
        try:
            return self.resolve(self.handle.borrow.remote(want))
        except Exception as exc:  # noqa: BLE001 - no pool, no sharding; the group still completes
            log.warning("scoring pool unavailable (%s); scoring locally", type(exc).__name__)
            return None, []

    def give_back(self, lease: str | None, dead: list[int]) -> None:
        if lease is None and not dead:
            return
        with contextlib.suppress(Exception):
            self.resolve(self.handle.give_back.remote(lease, dead))


@contextlib.contextmanager
def scoring_pool(model_config_json: str, sharding: Any, worker_cls: Any = None) -> Iterator[str | None]:
    """Start the job's pool on this (the driver's) node when sharding is on; yields its name (None: off)."""
    if sharding.mode == "off":
        yield None
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name = f"capray-scoring-{uuid.uuid4().hex[:12]}"
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
    handle = ray.remote(ScoringPool).options(name=name, num_cpus=0, scheduling_strategy=here).remote(
        model_config_json, sharding.model_dump_json(), worker_cls)
    ray.get(handle.stats.remote())  # registered before any runner looks for it
    try:
        yield name
    finally:
        with contextlib.suppress(Exception):
            ray.get(handle.shutdown.remote(), timeout=30)
        ray.kill(handle)
