"""Bulk protection at library scale, in the production block shape (one identity per block): does the
driver stay flat as the library grows, do reruns redo exactly what changed, and does a night with
nothing to do cost almost nothing?

A synthetic library of N identities (one small PNG each by default) sits on `LatencyFS`
(`benchmarks/latency_fs.py`): a local folder seen as an object store that counts requests (of the
driver and of every Ray worker) and waits a fixed latency for each (20 ms: a LIST per 1,000 keys,
HEAD, GET, PUT, DELETE). The engine is a stand-in that returns the photos unchanged (what is
measured is the sweep, slicing, done-check, commit and compaction machinery, not the engine). In
one Ray session:

1. `capray protect` over N small and N large identities: time from the call to the first committed
   identity, the driver's peak RSS, its RSS sampled against identities committed (the slope over
   the second half of the large run, which a per-identity leak cannot hide from), and the requests
   the *driver* made.
2. A rerun over the finished large library after changing 1% of its identities (a photo added, a
   photo replaced in place, a photo deleted, a third each): how many identities were redone, and
   the bytes its compaction wrote against the whole manifest's.
3. A rerun over the unchanged large library: every request, driver and tasks, per 1,000 identities.
4. A time-boxed run over a fresh library with a slow stand-in: it must stop within its budget plus
   grace, exit 1 (unfinished), and the next run must finish the rest with nothing protected twice.

The slice size (`batch.slice_identities`) defaults to `--n-small` here, so the large library spans
n/n_small slices as a 10M-identity library spans 1,000 of the default 10,000.

Last line:
RESULT scale n_small=<n> n_large=<n> first_commit_ratio=<t_large/t_small> driver_rss_ratio=<rss_large/rss_small>
    driver_kb_per_identity=<slope> driver_requests_per_1k=<n> rerun_redone=<count> rerun_expected=<count>
    manifest_files=<n> noop_requests_per_1k=<n> compaction_rewrite_ratio=<r> timebox_ok=<0|1>
Targets: first_commit_ratio ≤ 1.5, driver_rss_ratio ≤ 1.3, driver_kb_per_identity ≤ 0.5,
driver_requests_per_1k ≤ 5, rerun_redone == rerun_expected, manifest_files ≤ n_large/100,
noop_requests_per_1k ≤ 5, compaction_rewrite_ratio ≤ 0.1, timebox_ok = 1. Ratios and slopes, not
absolute times: CPU-only, shared machine.
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

from latency_fs import LatencyFS, all_requests, driver_requests, register  # noqa: E402

from capray.batch.stages import ProtectStage  # noqa: E402


class PassThroughActor(ProtectStage):
    """The engine stand-in: no models, the photos come back unchanged with a minimal record. With
    CALLS set (class attributes travel with the class to the actors), it logs each identity it
    protects there and takes GROUP_S seconds."""

    CALLS, GROUP_S = "", 0.0

    def load_protector(self):
        return None

    def run_engine(self, rgbs, identity, fixed=()):
        from capray.attack.api import ProtectionRecord

        if self.CALLS:
            with open(self.CALLS, "a") as fh:
                fh.write(identity + "\n")
            time.sleep(self.GROUP_S)
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


class RSSTrace:
    """The driver's resident memory while a run is going, sampled every 50 ms with the number of
    identities committed so far: its peak, and its slope against identities (KB per identity)."""

    def __init__(self):
        import psutil

        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self.committed = 0
        self.samples: list[tuple[int, int]] = []  # (identities committed, rss bytes)
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.is_set():
            rss = self.process.memory_info().rss
            self.peak = max(self.peak, rss)
            self.samples.append((self.committed, rss))
            time.sleep(0.05)

    def slope_kb_per_identity(self, from_identity: int) -> float | None:
        """Least-squares slope of RSS against identities committed, over samples past `from_identity`."""
        points = [(n, rss) for n, rss in self.samples if n >= from_identity]
        if len({n for n, _ in points}) < 2:
            return None
        xs, ys = np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)
        return float(np.polyfit(xs, ys, 1)[0] / 1024)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run(src: Path, out: Path, cfg, stage: type = PassThroughActor) -> dict:
    from capray.batch.command import protect

    start, first = time.perf_counter(), []
    before, before_all = driver_requests(), all_requests()
    with RSSTrace() as rss:
        def on_result(summary):
            rss.committed += 1
            if not first:
                first.append(time.perf_counter() - start)

        summary = protect(f"latency://{src}", f"latency://{out}", cfg, show_progress=False,
                          protect_stage=stage, on_result=on_result)
    return {"first_commit_s": first[0] if first else None, "peak_rss_mb": rss.peak / 2**20, "rss": rss,
            "driver_requests": driver_requests() - before, "all_requests": all_requests() - before_all,
            "summary": summary, "seconds": time.perf_counter() - start}


def timebox_check(work: Path, cfg, n: int, budget_s: float, grace_s: float, group_s: float) -> tuple[int, str]:
    """A time-boxed run that cannot finish, then an unboxed one: (1 if all is as promised else 0, details)."""
    import json

    calls = work / "timebox-calls.txt"
    calls.touch()
    slow = type("SlowPassThrough", (PassThroughActor,), {"CALLS": str(calls), "GROUP_S": group_s})
    make_library(work / "timebox", n, 1, seed=4)
    boxed = cfg.model_copy(update={"batch": cfg.batch.model_copy(update={
        "max_run_seconds": budget_s, "stop_grace_s": grace_s})})
    first = run(work / "timebox", work / "out-timebox", boxed, slow)
    totals = json.loads((work / "out-timebox" / "run.json").read_text())["totals"]
    second = run(work / "timebox", work / "out-timebox", cfg, slow)
    protected = calls.read_text().split()
    checks = {
        "stopped in time": totals["sweep_seconds"] <= budget_s + grace_s,
        "exit 1 (unfinished)": first["summary"].exit_code == 1 and first["summary"].stopped is not None,
        "some done, some left": 0 < first["summary"].ok < n,
        "next run finished the rest": second["summary"].exit_code == 0 and
                                      first["summary"].ok + second["summary"].ok == n,
        "nothing protected twice": len(protected) == len(set(protected)) == n,
    }
    details = (f"time box {budget_s:g}s + grace {grace_s:g}s: stopped after {totals['sweep_seconds']:.1f}s with "
               f"{first['summary'].ok} of {n} done, next run {second['summary'].ok}; "
               + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in checks.items()))
    return int(all(checks.values())), details


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-small", type=int, default=2000)
    parser.add_argument("--n", type=int, default=20000, help="identities in the large library")
    parser.add_argument("--photos", type=int, default=1, help="photos per identity")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="per request (LIST page, HEAD, GET, PUT)")
    parser.add_argument("--changed", type=float, default=0.01, help="fraction of identities changed before the rerun")
    parser.add_argument("--groups-per-block", type=int, default=1,
                        help="batch.groups_per_batch: identities per block after the check (1: production on GPUs)")
    parser.add_argument("--slice", type=int, default=None,
                        help="batch.slice_identities (default: --n-small, so the large library spans n/n_small "
                             "slices, as a 10M-identity library spans 1,000 of the default 10,000)")
    parser.add_argument("--first-commit-only", action="store_true",
                        help="only the time to the first commit, small vs large, each run time-boxed to a minute "
                             "(a quick recheck of that one ratio; last line RESULT scale_first_commit …)")
    args = parser.parse_args()

    os.environ["CAPRAY_BENCH_LATENCY_S"] = str(args.latency_ms / 1000)
    os.environ.setdefault("CAPRAY_BENCH_REQUEST_LOG", str(Path(tempfile.mkdtemp(prefix="capray-req-")) / "log"))
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
                 "env_vars": {k: os.environ[k] for k in ("CAPRAY_BENCH_LATENCY_S", "CAPRAY_BENCH_REQUEST_LOG",
                                                         "CAPRAY_CACHE")} | {"PYTHONPATH": pythonpath}})
    batch = {"groups_per_batch": args.groups_per_block, "num_actors": 2, "cpus_per_actor": 0.5}
    batch["slice_identities"] = args.slice or args.n_small
    cfg = load_config(preset="smoke", overrides={"model": {"sd": "tiny"}, "batch": batch})

    t0 = time.perf_counter()
    make_library(work / "small", args.n_small, args.photos, seed=0)
    make_library(work / "large", args.n, args.photos, seed=1)
    print(f"libraries written in {time.perf_counter() - t0:.0f}s under {work}", flush=True)
    make_library(work / "warm", 50, args.photos, seed=3)
    run(work / "warm", work / "out-warm", cfg)  # Ray Data's first execution starts worker processes: not measured
    results = {}
    if args.first_commit_only:  # the runs stop after a minute: only their first commit is looked at
        cfg = cfg.model_copy(update={"batch": cfg.batch.model_copy(update={"max_run_seconds": 60, "stop_grace_s": 30})})
    for name, n in (("small", args.n_small), ("large", args.n)):
        results[name] = r = run(work / name, work / f"out-{name}", cfg)
        s = r["summary"]
        print(f"{name:>5} N={n}: first commit after {r['first_commit_s']:.1f}s, run {r['seconds']:.0f}s, "
              f"driver peak RSS {r['peak_rss_mb']:.0f} MB, driver requests {r['driver_requests']}, "
              f"all requests {r['all_requests']}, {s.ok} ok / {s.failed} failed / {s.unfinished} unfinished",
              flush=True)
    if args.first_commit_only:
        small, large = results["small"]["first_commit_s"], results["large"]["first_commit_s"]
        print(f"RESULT scale_first_commit n_small={args.n_small} n_large={args.n} "
              f"first_commit_ratio={large / small:.2f}")
        ray.shutdown()
        return
    files = manifest_files(LatencyFS(), str(work / "out-large" / MANIFEST_DIR))
    expected = change_library(work / "large", args.n, args.changed, seed=2)
    again = run(work / "large", work / "out-large", cfg)
    s = again["summary"]
    redone = s.ok + s.failed + s.deleted
    import json

    compaction = json.loads((work / "out-large" / "run.json").read_text())["totals"]["compaction"]
    rewrite = compaction["bytes_written"] / compaction["manifest_bytes"]
    print(f"rerun after changing {expected} identities: {s.ok} ok + {s.failed} failed + {s.deleted} deleted redone, "
          f"{s.skipped} skipped, {s.unfinished} unfinished, run {again['seconds']:.0f}s, compaction wrote "
          f"{compaction['bytes_written']} of {compaction['manifest_bytes']} bytes (full merge: {compaction['full']})",
          flush=True)
    noop = run(work / "large", work / "out-large", cfg)
    print(f"unchanged rerun: {noop['all_requests']} requests in all ({noop['driver_requests']} by the driver), "
          f"{noop['summary'].skipped} skipped, run {noop['seconds']:.0f}s", flush=True)
    timebox_ok, details = timebox_check(work, cfg, n=200, budget_s=10, grace_s=20, group_s=0.3)
    print(details, flush=True)
    small, large = results["small"], results["large"]
    slope = large["rss"].slope_kb_per_identity(args.n // 2)
    print(f"RESULT scale n_small={args.n_small} n_large={args.n} "
          f"first_commit_ratio={large['first_commit_s'] / small['first_commit_s']:.2f} "
          f"driver_rss_ratio={large['peak_rss_mb'] / small['peak_rss_mb']:.2f} "
          f"driver_kb_per_identity={slope:.3f} "
          f"driver_requests_per_1k={large['driver_requests'] / (args.n / 1000):.2f} "
          f"rerun_redone={redone} rerun_expected={expected} manifest_files={len(files)} "
          f"noop_requests_per_1k={noop['all_requests'] / (args.n / 1000):.2f} "
          f"compaction_rewrite_ratio={rewrite:.3f} timebox_ok={timebox_ok}")
    ray.shutdown()


if __name__ == "__main__":
    main()
