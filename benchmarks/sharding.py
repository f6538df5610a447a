"""What λ-candidate sharding buys: one group's CAP-phase latency, and bulk throughput with `auto` vs `off`.

Everything runs on a local Ray with the tiny model (CPU); every process is pinned to `--threads` torch
threads, so one scorer is one core's worth of work and the comparison is fair on a small machine.

1. Single group. One group runner protects one group (FSMG with CAP on every PGD step, so the PGD
   phase is the CAP phase) alone (1 scorer), then with the pool's `--actors` scoring actors lent to it
   (`sharding.mode=always`: runner + actors scorers). The figure is the runner's PGD-phase seconds,
   median of `--reps` interleaved runs; the pixels of both runs are checked equal.
2. Bulk. `--groups` groups over `--runners` group runners (the protect actors' role), pulled from a
   queue as Ray Data's actor pool does, with `sharding.mode=off` (no pool) and `auto` (the same
   runners, plus the pool, lent only when idle). The figure is groups per second, auto / off, the
   median of `--bulk-reps` interleaved off/auto pairs.

One process pinned to one thread stands for one GPU, so the default uses as many processes as the
machine has cores: `--runners` = cores − `--actors` (1 runner + 1 scoring actor on 2 cores). On a
cluster the pool's actors hold GPUs of their own, so lending an idle one costs a runner nothing but
the transfers. With more processes than cores (e.g. `--runners 2 --actors 1` on 2 cores) the pool's
"device" is time-shared with the runners' and the bulk figure measures that CPU contention instead:
the situation of a fixed-size GPU cluster whose pool took GPUs the protect actors would have used.

The CPU capacity probe runs one group on one runner, then on two runners at once: 2 × t1 / t2 is how
many cores two processes really get (2.0 on an idle machine), about the most the single-group speedup
can reach on the machine at that moment.

Per-phase weight transfer: the bytes of one phase's state (the tiny UNet here; SD 2.1's figure comes
from `benchmarks/gpu_step.py` on a GPU) and the seconds to put it in the object store.

Last line: RESULT sharding single_group_speedup=<x> bulk_auto_vs_off=<ratio> actors=<n>
where `actors` counts the scorers one group used in the sharded run (the runner plus the pool's actors).
Targets: single_group_speedup ≥ 1.3 with 2 scorers; bulk_auto_vs_off ≥ 0.95.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def photos(n: int, seed: int, side: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(n)]


def bench_config(args, mode: str):
    from capray.config import load_config

    # Scoring calls of `--candidate-batch` candidates, chunks of 2 candidates: enough chunks to share.
    return load_config(preset="smoke", overrides={
        "attack": {"method": "fsmg", "pgd_steps": args.steps, "fsmg_train_steps": 1},
        "cap": {"ratio_max": args.ratio_max, "start_fraction": 0.0, "candidate_batch_size": args.candidate_batch,
                "score_image_batch_size": 2 * args.photos},
        "sharding": {"mode": mode, "actors": args.actors, "gpus_per_actor": 0, "cpus_per_actor": 0.5,
                     "torch_threads": args.threads}})


class GroupRunner:
    """A protect actor's role: models resident, one group at a time, candidates scored via the pool or not."""

    def __init__(self, model_json: str, threads: int):
        import torch

        from capray.attack.engine import load_models
        from capray.config import ModelConfig

        torch.set_num_threads(threads)
        self.models = load_models(ModelConfig.model_validate_json(model_json))

    def protect(self, cfg_json: str, rgbs: list[np.ndarray], identity: str, pool_name: str | None):
        from capray.attack.engine import protect_group
        from capray.attack.metrics import from_uint8, to_uint8
        from capray.config import CaprayConfig
        from capray.distributed.candidates import evaluator_factory_for
        from capray.distributed.pool import PoolClient

        cfg = CaprayConfig.model_validate_json(cfg_json)
        pool = PoolClient.for_actor(pool_name) if pool_name else None
        result = protect_group([from_uint8(a) for a in rgbs], cfg, identity=identity, models=self.models,
                               evaluator_factory=evaluator_factory_for(cfg.sharding, pool))
        return result.timings["pgd_s"], [to_uint8(t) for t in result.images]


def wait_ready(pool_name: str, actors: int) -> None:
    import ray

    pool = ray.get_actor(pool_name)
    while ray.get(pool.stats.remote())["ready"] < actors:
        time.sleep(0.2)


def cpu_capacity(args, runners) -> float:
    """Cores this benchmark really gets for two processes: 2 × (one runner alone) / (two at once).

    2.0 on an idle machine; on a CPU shared with other work, about the most a 2-scorer speedup can reach.
    """
    import ray

    if len(runners) < 2:
        return float("nan")
    cfg, rgbs = bench_config(args, "off").model_dump_json(), photos(args.photos, 0)
    one = ray.get(runners[0].protect.remote(cfg, rgbs, "probe", None))[0]
    two = max(s for s, _ in ray.get([r.protect.remote(cfg, rgbs, "probe", None) for r in runners[:2]]))
    capacity = 2 * one / two
    print(f"CPU capacity for two processes: {capacity:.2f} cores (2.00 on an idle machine; one noisy probe) — "
          f"about the most a 2-scorer speedup can reach here")
    return capacity


def single_group(args, runner) -> tuple[float, float]:
    import ray

    from capray.distributed.pool import scoring_pool

    rgbs = photos(args.photos, 0)
    alone_cfg, shared_cfg = bench_config(args, "off"), bench_config(args, "always")
    alone, shared = [], []
    with scoring_pool(shared_cfg.model.model_dump_json(), shared_cfg.sharding) as name:
        wait_ready(name, args.actors)
        ray.get(runner.protect.remote(shared_cfg.model_dump_json(), rgbs, "warm", name))  # peers warmed up
        for rep in range(args.reps):
            s_alone, px_alone = ray.get(runner.protect.remote(alone_cfg.model_dump_json(), rgbs, f"g{rep}", None))
            s_shared, px_shared = ray.get(runner.protect.remote(shared_cfg.model_dump_json(), rgbs, f"g{rep}", name))
            if not all(np.array_equal(a, b) for a, b in zip(px_alone, px_shared)):
                raise SystemExit("sharded pixels differ from local ones")
            alone.append(s_alone)
            shared.append(s_shared)
    a, s = statistics.median(alone), statistics.median(shared)
    print(f"single group: PGD (CAP) phase {a:.2f} s alone, {s:.2f} s with {args.actors} scoring actor(s) "
          f"(median of {args.reps})")
    return a, s


def bulk(args, runners, mode: str) -> float:
    """Groups per second over the runners, each pulling the next group when it finishes (as Ray Data does)."""
    import ray

    from capray.distributed.pool import scoring_pool

    cfg = bench_config(args, mode)
    groups = [(f"bulk{i}", photos(args.photos, 100 + i)) for i in range(args.groups)]
    with scoring_pool(cfg.model.model_dump_json(), cfg.sharding) as name:
        if name:
            wait_ready(name, args.actors)
        start = time.perf_counter()
        queue = list(groups)
        running = {}
        for runner in runners:
            if queue:
                identity, rgbs = queue.pop(0)
                running[runner.protect.remote(cfg.model_dump_json(), rgbs, identity, name)] = runner
        while running:
            (done,), _ = ray.wait(list(running), num_returns=1)
            runner = running.pop(done)
            ray.get(done)
            if queue:
                identity, rgbs = queue.pop(0)
                running[runner.protect.remote(cfg.model_dump_json(), rgbs, identity, name)] = runner
        seconds = time.perf_counter() - start
    rate = args.groups / seconds
    print(f"bulk {mode:>4}: {args.groups} groups over {len(runners)} runners in {seconds:.2f} s ({rate:.3f} groups/s)")
    return rate


def transfer_cost(args) -> None:
    import ray

    from capray.attack.cap import EvaluationContext
    from capray.attack.engine import load_models
    from capray.attack.group import GroupLayout
    from capray.distributed.candidates import PhaseState

    cfg = bench_config(args, "off")
    models = load_models(cfg.model)
    import torch

    cond = torch.zeros(1, 4, 4)
    context = EvaluationContext(models.parts.unet, cond, GroupLayout.of([torch.zeros(3, 8, 8)]), 64)
    t0 = time.perf_counter()
    state = PhaseState.of(context)
    ref = ray.put(state)
    seconds = time.perf_counter() - t0
    del ref
    print(f"per-phase weight transfer (tiny UNet): {state.nbytes / 1e6:.2f} MB, {seconds * 1e3:.1f} ms to copy "
          f"and put once per phase (SD 2.1: see benchmarks/gpu_step.py)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--actors", type=int, default=1, help="scoring actors in the pool (scorers = runner + actors)")
    p.add_argument("--runners", type=int, default=None,
                   help="group runners in the bulk comparison (default: cores − actors, at least 1)")
    p.add_argument("--bulk-reps", type=int, default=3, help="interleaved off/auto bulk runs (median)")
    p.add_argument("--groups", type=int, default=6)
    p.add_argument("--photos", type=int, default=4)
    p.add_argument("--steps", type=int, default=4, help="PGD steps (all with CAP)")
    p.add_argument("--ratio-max", type=int, default=100, help="R (the paper's 100): R + 1 candidates per CAP step")
    p.add_argument("--candidate-batch", type=int, default=101, help="cap.candidate_batch_size (one call per step)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (runner, scoring actor)")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    if args.runners is None:
        args.runners = max(1, len(os.sched_getaffinity(0)) - args.actors)

    import ray
    import torch

    from capray.models.tiny import ensure_tiny_model

    torch.set_num_threads(args.threads)
    ensure_tiny_model()  # $CAPRAY_CACHE or ~/.cache/capray, which the local workers see too
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)  # never a neighbour's Ray
    try:
        model_json = bench_config(args, "off").model.model_dump_json()
        actor = ray.remote(GroupRunner).options(num_cpus=0.5)
        runners = [actor.remote(model_json, args.threads) for _ in range(max(args.runners, 1))]
        warm = bench_config(args, "off").model_dump_json()  # class images cached, kernels warm: not timed
        ray.get([r.protect.remote(warm, photos(args.photos, 99), "warm", None) for r in runners])
        transfer_cost(args)
        capacity = cpu_capacity(args, runners)
        alone, shared = single_group(args, runners[0])
        ratios = []
        for _ in range(args.bulk_reps):  # interleaved, so drift on a shared machine hits both modes
            off = bulk(args, runners, "off")
            ratios.append(bulk(args, runners, "auto") / off)
    finally:
        ray.shutdown()
    bulk_ratio = statistics.median(ratios)
    print(f"single-group speedup {alone / shared:.3f}; two-process CPU capacity {capacity:.2f} cores; bulk auto/off "
          f"per pair {', '.join(f'{r:.3f}' for r in ratios)} "
          f"({args.runners} runner(s), {args.actors} scoring actor(s))")
    print(f"RESULT sharding single_group_speedup={alone / shared:.3f} bulk_auto_vs_off={bulk_ratio:.3f} "
          f"actors={args.actors + 1}")


if __name__ == "__main__":
    main()
