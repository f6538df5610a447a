"""What the Ray pipeline costs over calling the engine in a loop, and whether its memory stays flat.

1. The same identities through (a) an in-process loop over the very same stage functions (decode →
   engine → encode + write + commit) and (b) `capray protect` on Ray with one actor. Throughput is
   steady-state: identities per second between the first and the last finished identity, so the
   one-off actor start and model load (reported separately) do not count. The in-process loop uses
   as many torch threads as the actor gets (Ray sets OMP_NUM_THREADS from the actor's CPUs).
2. Many small identities through the pipeline, sampling the resident memory of the driver and every
   Ray process it started after each finished identity: growth = last sample / sample after warm-up.

Last line: RESULT pipeline_overhead throughput_ratio=<ray/inprocess> peak_rss_mb=<m> rss_growth=<last/first>
Targets: ratio ≥ 0.85, growth ≤ 1.2. CPU-only here; numbers are noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def make_identities(root: Path, n: int, photos: int, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"id{i:05d}"
        folder.mkdir(parents=True)
        for j in range(photos):
            Image.fromarray(rng.integers(0, 256, (size, size + 8 * j, 3), dtype=np.uint8)).save(folder / f"{j}.png")


def config(outer_loops: int, adv_steps: int):
    from capray.config import load_config

    return load_config(preset="smoke", overrides={"attack": {"outer_loops": outer_loops, "adv_steps": adv_steps},
                                                  "batch": {"num_actors": 1, "cpus_per_actor": 1.0,
                                                            # one identity per commit, so results arrive
                                                            # one by one and the steady rate is measurable
                                                            "records_per_commit": 1}})


def in_process(src: Path, out: Path, cfg) -> tuple[float, list[float]]:
    """The pipeline's stage functions called in a plain loop; returns (model load s, finish times)."""
    import torch

    from capray.batch.plan import make_plan, write_run_file
    from capray.batch.stages import CheckStage, CommitStage, DecodeStage, ProtectStage, WriteStage
    from capray.io.discover import iter_identity_names
    from capray.io.storage import get_fs

    torch.set_num_threads(max(1, int(cfg.batch.cpus_per_actor)))
    plan = make_plan(str(src), str(out), cfg)
    write_run_file(plan, cfg)
    t0 = time.perf_counter()
    actor = ProtectStage(cfg.model_dump_json())
    check = CheckStage(cfg, plan.output, input_root=plan.input, allowed=None, resuming=plan.resuming)
    decode, write = DecodeStage(cfg), WriteStage(cfg, plan.output)
    commit = CommitStage(cfg, plan.output, plan.run_id)
    load_s = time.perf_counter() - t0
    times = []
    fs, root = get_fs(plan.input)
    for names, _ in iter_identity_names(fs, root):
        for name in sorted(names):
            row = check.process({"identity": name, "uris": None})
            commit.commit([write.process(actor.process(decode.process(row)))])
            times.append(time.perf_counter())
    return load_s, times


def on_ray(src: Path, out: Path, cfg, sample=None) -> tuple[float, list[float]]:
    from capray.batch.command import protect

    times: list[float] = []
    start = time.perf_counter()

    def on_result(_summary):
        times.append(time.perf_counter())
        if sample:
            sample(len(times))

    protect(str(src), str(out), cfg, show_progress=False, on_result=on_result)
    return times[0] - start, times


def steady_rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0])


def tree_rss_mb() -> float:
    import psutil

    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=8)
    parser.add_argument("--photos", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--many", type=int, default=150, help="small identities for the memory run")
    parser.add_argument("--outer-loops", type=int, default=2)
    parser.add_argument("--adv-steps", type=int, default=2)
    args = parser.parse_args()

    from capray.cluster import connect_ray

    work = Path(tempfile.mkdtemp(prefix="capray-bench-"))
    os.environ.setdefault("CAPRAY_CACHE", str(work / "cache"))
    cfg = config(args.outer_loops, args.adv_steps)
    src = work / "in"
    make_identities(src, args.identities, args.photos, args.size, seed=0)
    from capray.models.tiny import ensure_tiny_model

    ensure_tiny_model()
    load_in, t_in = in_process(src, work / "out-inprocess", cfg)
    rate_in = steady_rate(t_in)
    connect_ray(None)
    start_ray, t_ray = on_ray(src, work / "out-ray", cfg)
    rate_ray = steady_rate(t_ray)
    same = all((work / "out-inprocess" / p.relative_to(work / "out-ray")).read_bytes() == p.read_bytes()
               for p in (work / "out-ray").rglob("*.png"))
    print(f"in-process : {rate_in:.3f} identities/s steady ({args.identities} identities × {args.photos} photos "
          f"{args.size}px; model load {load_in:.1f}s)")
    print(f"ray, 1 actor: {rate_ray:.3f} identities/s steady (first identity after {start_ray:.1f}s: Ray Data "
          f"start + actor + model load)")
    print(f"outputs byte-identical between the two: {same}")

    many = work / "many"
    make_identities(many, args.many, 1, 32, seed=1)
    small = config(1, 1)
    samples: list[tuple[int, float]] = []
    on_ray(many, work / "out-many", small, sample=lambda k: samples.append((k, tree_rss_mb())))
    warm = samples[min(len(samples) - 1, max(5, len(samples) // 10))][1]
    last, peak = samples[-1][1], max(s[1] for s in samples)
    marks = [samples[int(f * (len(samples) - 1))] for f in (0.1, 0.25, 0.5, 0.75, 1.0)]
    print(f"memory over {args.many} small identities (driver + Ray processes, MB): "
          + ", ".join(f"after {k}: {m:.0f}" for k, m in marks))
    ratio, growth = rate_ray / rate_in, last / warm
    print(f"RESULT pipeline_overhead throughput_ratio={ratio:.3f} peak_rss_mb={peak:.0f} rss_growth={growth:.3f}")


if __name__ == "__main__":
    main()
