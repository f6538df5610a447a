"""λ-candidate sharding over a pool of scoring actors changes nothing: same λ, same pixels as local scoring.

Also: the pool lends only what it may lend now (never waits), peers fetch a phase's weights once and
drop them when the phase ends, and a scoring actor that dies mid-step costs nothing but time.
"""

from __future__ import annotations

import math
import os
import sys
import time

import pytest
import ray
import torch

from capray import protect_group
from capray.distributed.candidates import ScoringActor

pytestmark = pytest.mark.ray


def _images(n: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1


def _exact_config(method: str, mode: str = "always"):
    from capray.config import load_config

    # fp64: scoring a shard on a peer gives the very floats scoring it here gives
    return load_config(preset="smoke", overrides={
        "model": {"dtype": "fp64"}, "attack": {"method": method},
        "cap": {"ratio_max": 12, "start_fraction": 0.0, "candidate_batch_size": 6, "score_image_batch_size": 6},
        "sharding": {"mode": mode, "actors": 2, "gpus_per_actor": 0, "cpus_per_actor": 0.25,
                     "torch_threads": 1}})


@pytest.fixture
def one_thread():
    """The runner on the peers' thread setup: CPU kernels' last bits depend on it (Ray gives 1 below 1 CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Recording:
    """Wraps an evaluator factory to keep the evaluators it built (one per PGD phase)."""

    def __init__(self, factory):
        self.factory, self.built = factory, []

    def __call__(self, **kwargs):
        evaluator = self.factory(**kwargs)
        self.built.append(evaluator)
        return evaluator


def wait_until(ready, what: str, timeout_s: float = 120.0, poll_s: float = 0.05) -> None:
    """Poll `ready()` with a sleep until it is true; fail naming `what` after `timeout_s` (never spin)."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert time.monotonic() < deadline, f"{what} not ready after {timeout_s:g}s"
        time.sleep(poll_s)


@pytest.fixture(scope="module")
def pool(ray_cluster, tiny_model_dir):
    from capray.distributed.pool import PoolClient, scoring_pool

    cfg = _exact_config("aspl")
    with scoring_pool(cfg.model.model_dump_json(), cfg.sharding) as name:
        client = PoolClient.for_actor(name)
        # both peers loaded, so every test shards over two of them
        wait_until(lambda: ray.get(client.handle.stats.remote())["ready"] >= 2, "two scoring peers")
        yield client


@pytest.mark.parametrize("method", ["fsmg", pytest.param("aspl", marks=pytest.mark.slow),
                                    pytest.param("simac", marks=pytest.mark.slow)])
def test_sharded_equals_local(pool, one_thread, method):
    from capray.attack.engine import load_models
    from capray.distributed.candidates import evaluator_factory_for

    cfg = _exact_config(method)
    models = load_models(cfg.model)
    factory = Recording(evaluator_factory_for(cfg.sharding, pool))
    peers = ray.get(pool.handle.borrow.remote(9))[1]
    fetched = sum(ray.get(peer.fetch_counts.remote())["vectors"] for _, peer in peers)
    sharded = protect_group(_images(), cfg, identity="shard", models=models, evaluator_factory=factory)
    local = protect_group(_images(), cfg, identity="shard", models=models)
    # the four vectors went into the object store once per step (not once per call: candidate_batch_size
    # 6 of 13 candidates makes 3 calls a step), and each peer fetched them at most once per step
    steps = len(sharded.distinct_counts)
    assert 1 <= sum(e.vector_puts for e in factory.built) <= steps
    fetched = sum(ray.get(peer.fetch_counts.remote())["vectors"] for _, peer in peers) - fetched
    assert 1 <= fetched <= len(peers) * steps
    assert all(r is not None for r in local.lambda_schedule)
    assert sharded.lambda_schedule == local.lambda_schedule
    assert all(torch.equal(a, b) for a, b in zip(sharded.images, local.images))
    assert sum(e.remote_candidates for e in factory.built) > 0  # peers really scored
    assert all(e.rescored == 0 for e in factory.built)
    # each phase's weights reached the object store once, and every peer dropped them when it ended
    assert len(factory.built) == (1 if method == "fsmg" else cfg.attack.outer_loops)
    assert all(e.state_ref is None and not e.used for e in factory.built)
    for _, peer in ray.get(pool.handle.borrow.remote(9))[1]:  # 'always' lends every ready actor
        assert ray.get(peer.cached.remote()) == []


def test_peers_fetch_a_phase_once_and_cache_by_phase(pool, one_thread):
    """A peer scores many calls of one phase on one fetched copy of its weights."""
    from capray.attack.cap import EvaluationContext, InProcessEvaluator
    from capray.attack.engine import load_models
    from capray.attack.group import GroupLayout
    from capray.attack.losses import reconstruction_loss
    from capray.attack.randomness import draw_noise
    from capray.distributed.candidates import PhaseState, PooledEvaluator
    from capray.models.sd import encode_prompt

    cfg = _exact_config("aspl")
    models = load_models(cfg.model)
    parts = models.parts
    layout = GroupLayout.of(list(_images(2)))
    cond = encode_prompt(parts, cfg.attack.instance_prompt)

    def image_loss(images, rows):
        return reconstruction_loss(parts, parts.unet, cond, images, rows)

    context = EvaluationContext(parts.unet, cond, layout, 64)
    local = InProcessEvaluator(image_loss, layout, 64, 4)
    evaluator = PooledEvaluator(pool, context, local, 4, shard_timeout_s=60)
    flat = layout.flatten(list(_images(2).double()))
    candidates = torch.stack([(flat + 0.01 * i).clamp(-1, 1) for i in range(5)])
    draw = draw_noise(2, (4, 8, 8), 0, "x", num_train_timesteps=parts.scheduler.config.num_train_timesteps)
    first, second = evaluator(candidates, draw), evaluator(candidates, draw)
    assert torch.equal(first, local(candidates, draw)) and torch.equal(second, first)
    peers = list(evaluator.used.values())
    assert peers and all(evaluator.key in ray.get(p.cached.remote()) for p in peers)
    assert evaluator.state_bytes == PhaseState.of(context).nbytes == sum(
        t.numel() * t.element_size() for t in parts.unet.state_dict().values())
    evaluator.close()
    assert all(evaluator.key not in ray.get(p.cached.remote()) for p in peers)


class DiesOnFirstScore(ScoringActor):
    """The first scoring call in the whole pool ends its process, mid-call (a crash, OOM kill, lost node)."""

    MARKER = ""

    def score(self, *args, **kwargs):
        try:
            os.close(os.open(self.MARKER, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return super().score(*args, **kwargs)
        os._exit(1)


@pytest.mark.slow
def test_a_scoring_actor_dying_mid_step_changes_nothing(ray_cluster, tiny_model_dir, tmp_path, one_thread):
    from ray import cloudpickle

    from capray.attack.engine import load_models
    from capray.distributed.candidates import evaluator_factory_for
    from capray.distributed.pool import PoolClient, scoring_pool

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the pool actor builds this test's workers
    cfg = _exact_config("aspl")
    dies = ray.remote(max_restarts=0)(type("Dies", (DiesOnFirstScore,), {"MARKER": str(tmp_path / "died")}))
    models = load_models(cfg.model)
    with scoring_pool(cfg.model.model_dump_json(), cfg.sharding, worker_cls=dies) as name:
        client = PoolClient.for_actor(name)
        wait_until(lambda: ray.get(client.handle.stats.remote())["ready"] >= 2, "two scoring peers")
        factory = Recording(evaluator_factory_for(cfg.sharding, client))
        sharded = protect_group(_images(), cfg, identity="shard", models=models, evaluator_factory=factory)
        stats = ray.get(client.handle.stats.remote())
    local = protect_group(_images(), cfg, identity="shard", models=models)
    assert (tmp_path / "died").exists()
    assert sum(e.rescored for e in factory.built) == 1  # the dead actor's shard, re-scored by the runner
    assert sharded.lambda_schedule == local.lambda_schedule
    assert all(torch.equal(a, b) for a, b in zip(sharded.images, local.images))
    assert stats["ready"] + stats["starting"] == 2  # the pool replaced the dead actor


@ray.remote(max_restarts=0)
class Placeholder:
    """A scoring actor without models: enough to test what the pool lends."""

    def __init__(self, *args):
        pass

    def ready(self) -> int:
        return os.getpid()


def _pool(mode: str, actors: int = 2, shard_timeout_s: float = 300.0):
    from capray.config import ShardingConfig
    from capray.distributed.pool import ScoringPool

    sharding = ShardingConfig(mode=mode, actors=actors, gpus_per_actor=0, cpus_per_actor=0.01,
                              shard_timeout_s=shard_timeout_s)
    pool = ScoringPool("{}", sharding.model_dump_json(), worker_cls=Placeholder)
    wait_until(lambda: pool.stats()["ready"] >= actors, f"{actors} placeholder peers")
    return pool


def test_auto_lends_only_idle_actors_and_never_waits(ray_cluster):
    pool = _pool("auto")
    try:
        lease_a, first = pool.borrow(1)
        lease_b, rest = pool.borrow(5)  # asks for more than is idle: gets what is idle, at once
        assert len(first) == 1 and len(rest) == 1 and {i for i, _ in first}.isdisjoint(i for i, _ in rest)
        assert pool.borrow(3) == (None, [])  # everything held: nothing lent, nothing waited for
        pool.give_back(lease_a, [])
        assert [i for i, _ in pool.borrow(3)[1]] == [i for i, _ in first]
        pool.give_back(lease_b, [i for i, _ in rest])  # died: retired and replaced
        assert pool.stats()["ready"] + pool.stats()["starting"] == 2
        assert rest[0][0] not in pool.workers
    finally:
        pool.shutdown()


def test_a_lease_never_given_back_is_reclaimed(ray_cluster):
    """A runner that died holding actors does not keep them from everyone else for ever."""
    pool = _pool("auto", shard_timeout_s=0.2)
    try:
        assert len(pool.borrow(2)[1]) == 2 and pool.borrow(2) == (None, [])
        time.sleep(0.5)  # > 2 × shard_timeout_s
        assert len(pool.borrow(2)[1]) == 2
    finally:
        pool.shutdown()


def test_always_shares_every_ready_actor(ray_cluster):
    pool = _pool("always")
    try:
        assert len(pool.borrow(5)[1]) == 2 and len(pool.borrow(5)[1]) == 2
        assert len(pool.borrow(1)[1]) == 1
    finally:
        pool.shutdown()


def test_sharding_is_outside_the_config_hash(smoke_config):
    off = smoke_config()
    on = smoke_config(sharding={"mode": "always", "actors": 4})
    assert on.config_hash() == off.config_hash() and "sharding" not in on.engine_dict()


@pytest.mark.parametrize("n,chunk,m,parts", [(3, 6, 7, 3), (4, 32, 101, 2), (4, 8, 48, 3), (5, 7, 40, 4)])
def test_shards_are_cut_only_between_the_local_scoring_chunks(n, chunk, m, parts):
    """Each shard starts on a chunk boundary of local scoring, so its images meet the same chunk companions."""
    from types import SimpleNamespace

    from capray.distributed.candidates import PooledEvaluator

    context = SimpleNamespace(layout=SimpleNamespace(n=n))
    shards = PooledEvaluator(None, context, None, chunk, 1.0).shards(m, parts)
    assert shards[0][0] == 0 and shards[-1][1] == m
    assert all(a[1] == b[0] for a, b in zip(shards, shards[1:]))  # contiguous, in r order
    assert all(start * n % chunk == 0 for start, _ in shards)  # image row of each start: a chunk start
    unit = math.lcm(n, chunk) // n  # candidates per whole number of chunks
    assert len(shards) == min(parts, math.ceil(m / unit))


@ray.remote(max_restarts=0)
class Hangs:
    """A scoring actor that never answers (a hung GPU, a wedged node)."""

    def __init__(self, *args):
        pass

    def ready(self) -> int:
        return os.getpid()

    def score(self, *args):
        time.sleep(120)


class FakePool:
    """Lends the given peers, records every lease given back."""

    def __init__(self, peers):
        self.peers, self.returned = peers, []

    def borrow(self, want: int):
        return "lease", self.peers[:want]

    def give_back(self, lease, dead) -> None:
        self.returned.append((lease, sorted(dead)))


def _toy_pooled(pool, local_cls=None, timeout_s: float = 60.0):
    from capray.attack.cap import EvaluationContext, InProcessEvaluator
    from capray.attack.group import GroupLayout
    from capray.attack.randomness import NoiseDraw
    from capray.distributed.candidates import PooledEvaluator

    layout = GroupLayout(((3, 4, 4), (3, 4, 4)))

    def image_loss(images, rows):
        return images.flatten(1).pow(2).sum(1)

    local = (local_cls or InProcessEvaluator)(image_loss, layout, 4, 2)
    context = EvaluationContext(torch.nn.Linear(1, 1), torch.zeros(1), layout, 4)
    draw = NoiseDraw(torch.zeros(2, dtype=torch.long), torch.zeros(2, 1, 1, 1), torch.zeros(2, 1, 1, 1))
    cands = torch.rand(6, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return PooledEvaluator(pool, context, local, 2, shard_timeout_s=timeout_s), local, cands, draw


def test_hung_peers_share_one_deadline(ray_cluster):
    """k hung peers cost one shard_timeout_s, not k of them; their shards are re-scored here."""
    peers = [(i, Hangs.remote()) for i in range(2)]
    try:
        ray.get([p.ready.remote() for _, p in peers])
        pool = FakePool(peers)
        evaluator, local, cands, draw = _toy_pooled(pool, timeout_s=1.5)
        t0 = time.monotonic()
        scores = evaluator(cands, draw)
        took = time.monotonic() - t0
        assert torch.equal(scores, local(cands, draw))
        assert evaluator.rescored == 2 and evaluator.remote_candidates == 0
        assert took < 2.8, took  # one deadline (1.5 s), where one per peer in turn took ≥ 3 s
        assert pool.returned == [("lease", [0, 1])]
    finally:
        for _, p in peers:
            ray.kill(p)


def test_a_local_failure_still_ends_the_lease(ray_cluster):
    """Scoring the runner's own shard raising (e.g. out of memory) cancels the peers and gives the lease back."""
    from capray.attack.cap import InProcessEvaluator

    class OutOfMemory(InProcessEvaluator):
        def __call__(self, candidates, draw):
            raise MemoryError("no room for the runner's shard")

    peers = [(i, Hangs.remote()) for i in range(2)]
    try:
        ray.get([p.ready.remote() for _, p in peers])
        pool = FakePool(peers)
        evaluator, _, cands, draw = _toy_pooled(pool, local_cls=OutOfMemory)
        t0 = time.monotonic()
        with pytest.raises(MemoryError):
            evaluator(cands, draw)
        assert time.monotonic() - t0 < 30  # did not wait for the hung peers
        assert pool.returned == [("lease", [])]  # given back; the peers did nothing wrong
    finally:
        for _, p in peers:
            ray.kill(p)
