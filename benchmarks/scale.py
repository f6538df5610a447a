"""Bulk protection at library scale: does the driver stay flat as the library grows, and do reruns redo
exactly what changed?

A synthetic library of N identities (one small PNG each by default) sits on `LatencyFS`
(`benchmarks/latency_fs.py`): a local folder seen as an object store that counts requests and waits
a fixed latency for each (20 ms: a LIST per 1,000 keys, HEAD, GET, PUT, DELETE). The engine is a
stand-in that returns the photos unchanged (what is measured is the plan, listing, done-check and
commit machinery, not the engine). In one Ray session:

1. `capray protect` over N small and N large identities: time from the call to the first committed
   identity, the driver's peak RSS during the run, and the requests the *driver* made
   (listing, done-check and commits run in Ray tasks and are not the driver's).
2. A rerun over the finished large library after changing 1% of its identities (a photo added, a
   photo replaced in place, a photo deleted, a third each): how many identities were redone.
3. The number of files in OUT/manifest after the run's automatic compaction.

Last line:
RESULT scale n_small=<n> n_large=<n> first_commit_ratio=<t_large/t_small> driver_rss_ratio=<rss_large/rss_small>
    driver_requests_per_1k=<n> rerun_redone=<count> rerun_expected=<count> manifest_files=<n>
Targets: first_commit_ratio ≤ 1.5, driver_rss_ratio ≤ 1.3, driver_requests_per_1k ≤ 5,
rerun_redone == rerun_expected, manifest_files ≤ n_large/100. Ratios, not absolute times: CPU-only,
shared machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from latency_fs import LatencyFS, driver_requests, register  # noqa: E402

from capray.batch.stages import ProtectStage  # noqa: E402


class PassThroughActor(ProtectStage):
    """The engine stand-in: no models, the photos come back unchanged with a minimal record."""

    def load_protector(self):
        return None

    def run_engine(self, rgbs, identity):
        from capray.attack.api import ProtectionRecord

        return rgbs, ProtectionRecord.unprotected(self.cfg, identity)


def png(rng, size: int = 12) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_library(root: Path, n: int, photos: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"id{i:07d}"
        folder.mkdir(parents=True)
        for j in range(photos):
            (folder / f"{j}.png").write_bytes(png(rng))


def change_library(root: Path, n: int, fraction: float, seed: int) -> int:
    """Change `fraction` of the identities: add, replace in place, or delete a photo (a third each)."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(n, size=max(3, int(round(n * fraction))), replace=False)
    for k, i in enumerate(sorted(chosen)):
        folder = root / f"id{i:07d}"
        if k % 3 == 0:
            (folder / "added.png").write_bytes(png(rng))
        elif k % 3 == 1:
            (folder / "0.png").write_bytes(png(rng, 14))  # replaced in place: new size and mtime
        else:
            (folder / "0.png").unlink()  # deleted: its output must go (identity may end with no photos)
    return len(chosen)


class PeakRSS:
    """The driver's peak resident memory while a run is going, sampled every 50 ms."""

    def __init__(self):
        import psutil

        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run(src: Path, out: Path, cfg) -> dict:
    from capray.batch.command import protect

    start, first = time.perf_counter(), []
    before = driver_requests()
    with PeakRSS() as rss:
        summary = protect(f"latency://{src}", f"latency://{out}", cfg, show_progress=False,
                          protect_stage=PassThroughActor,
                          on_result=lambda s: first or first.append(time.perf_counter() - start))
    return {"first_commit_s": first[0] if first else None, "peak_rss_mb": rss.peak / 2**20,
            "driver_requests": driver_requests() - before, "summary": summary,
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-small", type=int, default=2000)
    parser.add_argument("--n", type=int, default=20000, help="identities in the large library")
    parser.add_argument("--photos", type=int, default=1, help="photos per identity")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="per request (LIST page, HEAD, GET, PUT)")
    parser.add_argument("--changed", type=float, default=0.01, help="fraction of identities changed before the rerun")
    parser.add_argument("--groups-per-block", type=int, default=32,
                        help="batch.groups_per_batch: identities per block after listing (1 in production on GPUs)")
    args = parser.parse_args()

    os.environ["CAPRAY_BENCH_LATENCY_S"] = str(args.latency_ms / 1000)
    register()
    import ray

    from capray.config import load_config
    from capray.io.manifest import MANIFEST_DIR, manifest_files
    from capray.models.tiny import ensure_tiny_model

    work = Path(tempfile.mkdtemp(prefix="capray-scale-"))
    os.environ.setdefault("CAPRAY_CACHE", str(work / "cache"))
    ensure_tiny_model()  # the plan's preflight checks the configured model exists
    pythonpath = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    ray.init(address="local", num_cpus=8, object_store_memory=512 * 1024**2, include_dashboard=False,
             log_to_driver=False, runtime_env={
                 "worker_process_setup_hook": "latency_fs.register",
                 "env_vars": {"CAPRAY_BENCH_LATENCY_S": os.environ["CAPRAY_BENCH_LATENCY_S"],
                              "CAPRAY_CACHE": os.environ["CAPRAY_CACHE"], "PYTHONPATH": pythonpath}})
    cfg = load_config(preset="smoke", overrides={"model": {"sd": "tiny"}, "batch": {
        "groups_per_batch": args.groups_per_block, "num_actors": 2, "cpus_per_actor": 0.5}})

    t0 = time.perf_counter()
    make_library(work / "small", args.n_small, args.photos, seed=0)
    make_library(work / "large", args.n, args.photos, seed=1)
    print(f"libraries written in {time.perf_counter() - t0:.0f}s under {work}", flush=True)
    make_library(work / "warm", 50, args.photos, seed=3)
    run(work / "warm", work / "out-warm", cfg)  # Ray Data's first execution starts worker processes: not measured
    results = {}
    for name, n in (("small", args.n_small), ("large", args.n)):
        results[name] = r = run(work / name, work / f"out-{name}", cfg)
        s = r["summary"]
        print(f"{name:>5} N={n}: first commit after {r['first_commit_s']:.1f}s, run {r['seconds']:.0f}s, "
              f"driver peak RSS {r['peak_rss_mb']:.0f} MB, driver requests {r['driver_requests']} "
              f"({dict(LatencyFS.counts)} so far), {s.ok} ok / {s.failed} failed / {s.unfinished} unfinished",
              flush=True)
    files = manifest_files(LatencyFS(), str(work / "out-large" / MANIFEST_DIR))
    expected = change_library(work / "large", args.n, args.changed, seed=2)
    again = run(work / "large", work / "out-large", cfg)
    s = again["summary"]
    redone = s.ok + s.failed
    print(f"rerun after changing {expected} identities: {s.ok} ok + {s.failed} failed redone, {s.skipped} skipped, "
          f"{s.unfinished} unfinished, run {again['seconds']:.0f}s, driver requests {again['driver_requests']}")
    small, large = results["small"], results["large"]
    print(f"RESULT scale n_small={args.n_small} n_large={args.n} "
          f"first_commit_ratio={large['first_commit_s'] / small['first_commit_s']:.2f} "
          f"driver_rss_ratio={large['peak_rss_mb'] / small['peak_rss_mb']:.2f} "
          f"driver_requests_per_1k={large['driver_requests'] / (args.n / 1000):.2f} "
          f"rerun_redone={redone} rerun_expected={expected} manifest_files={len(files)}")
    ray.shutdown()


if __name__ == "__main__":
    main()
