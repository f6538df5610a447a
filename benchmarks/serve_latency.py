"""What the online endpoint adds to an engine call, and whether concurrent clients lose anything.

1. Latency overhead. The same smoke-preset group (2 photos) is protected `--reps` times through
   `POST /v1/protect:sync` over HTTP on 127.0.0.1 (`capray.client`: multipart upload, API key, streamed
   body, decode, Protector call, PNG encode, JSON) and, interleaved, by the same `capray.Protector` call
   in this process.
   Each HTTP request's overhead is its wall time minus the engine time the server measured for that
   very call (`engine_seconds`: the wall time of `protect_arrays` inside the Protector), so the
   engine's own run-to-run noise on a shared CPU does not enter the difference; the in-process direct
   call's median is printed beside it as a cross-check.
2. Concurrency. `--clients` threads (at most the server's pending-job capacity, loopback only) each
   submit `--jobs` jobs and poll them to the end (`capray.client.Client`, no retries, polling at the
   server's Retry-After), bounded by `--timeout` seconds. errors = refused
   submissions or failed jobs; lost = jobs that are unknown (404) or still pending at the deadline.

Last line: RESULT serve_latency overhead_p50_ms=<m> overhead_p95_ms=<m> concurrent=<n> errors=<e> lost=<l>
Targets: p50 overhead ≤ 50 ms; zero errors and zero lost jobs below the queue bound. CPU-only numbers here.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
KEY = "benchmark-key"  # the latency phase's; each concurrent client has its own key, as users do


def client_key(i: int) -> str:
    return f"{KEY}-{i}"


def photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    low = rng.integers(30, 225, size=(max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(low).resize((w, h), Image.BILINEAR))


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def latency(url: str, photos: list[tuple[str, bytes]], rgbs: list[np.ndarray], cfg,
            reps: int) -> tuple[list[float], list[float]]:
    """(per-request overhead ms, direct in-process engine ms), interleaved."""
    import torch

    from capray import Protector
    from capray.client import Client

    torch.set_num_threads(1)  # as in the one-CPU Protector replica
    protector = Protector.from_config(cfg)
    overhead, direct = [], []
    with Client(url, KEY, timeout=300, retries=0) as client:  # no retry may hide inside a timed request
        client.protect_sync(photos, "alice")  # warm-up: first call paths
        protector(rgbs, "alice")
        for _ in range(reps):
            t0 = time.perf_counter()
            result = client.protect_sync(photos, "alice")
            wall = time.perf_counter() - t0
            overhead.append((wall - result["engine_seconds"]) * 1000)
            t0 = time.perf_counter()
            protector(rgbs, "alice")
            direct.append((time.perf_counter() - t0) * 1000)
    return overhead, direct


def concurrent(url: str, photos: list[tuple[str, bytes]], clients: int, jobs: int,
               timeout: float) -> tuple[int, int, int]:
    """(jobs ok, errors, lost) for `clients` threads each submitting and polling `jobs` jobs."""
    from capray.client import CaprayError, Client, JobFailed

    deadline = time.monotonic() + timeout
    counts = {"ok": 0, "errors": 0, "lost": 0}
    lock = threading.Lock()

    def client_loop(i: int) -> None:
        # retries=0: a refused submission counts as an error, not as a success after a retry
        with Client(url, client_key(i), timeout=60, retries=0) as client:
            ids = []
            for _ in range(jobs):
                try:
                    ids.append(client.submit(photos, "alice").job_id)
                except CaprayError as refused:
                    print(f"client {i}: submit refused: {refused}", flush=True)
                    with lock:
                        counts["errors"] += 1
            for job_id in ids:
                try:
                    client.wait(job_id, timeout=max(0.0, deadline - time.monotonic()))
                    outcome = "ok"
                except JobFailed:
                    outcome = "errors"
                except CaprayError:  # unknown (404), unreachable, or still pending at the deadline
                    outcome = "lost"
                with lock:
                    counts[outcome] += 1

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 60)
    return counts["ok"], counts["errors"], counts["lost"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=20, help="sync requests for the latency overhead")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (≤ the server's capacity)")
    parser.add_argument("--jobs", type=int, default=2, help="jobs per client")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for the concurrent phase")
    args = parser.parse_args()

    import ray
    from ray import serve

    from capray.config import load_config
    from capray.serve.app import app_from_config
    from capray.serve.body_limit import proxy_env

    work = Path(tempfile.mkdtemp(prefix="capray-serve-bench-"))
    (work / "keys").write_text("\n".join([KEY, *map(client_key, range(args.clients))]) + "\n")
    os.environ.setdefault("CAPRAY_CACHE", str(work / "cache"))
    cfg = load_config(preset="smoke", overrides={"model": {"sd": "tiny"}, "serve": {
        "min_replicas": 1, "max_replicas": 1, "gpus_per_replica": 0, "cpus_per_replica": 1, "ingress_cpus": 0,
        "store": str(work / "store"), "api_keys_file": str(work / "keys")}})
    if not 1 <= args.clients <= cfg.serve.capacity:
        parser.error(f"--clients must be 1..{cfg.serve.capacity} (the server's pending-job capacity)")
    rgbs = [photo(64, 64, 1), photo(64, 64, 2)]
    photos = [(f"p{i}.png", png(a)) for i, a in enumerate(rgbs)]
    from capray.models.tiny import ensure_tiny_model

    ensure_tiny_model(os.environ["CAPRAY_CACHE"])
    os.environ.update(proxy_env(cfg.serve.max_request_bytes))  # as `capray serve` starts its Ray
    ray.init(address="local", num_cpus=8, include_dashboard=False, object_store_memory=256 * 1024**2,
             log_to_driver=False, runtime_env={"env_vars": {"CAPRAY_CACHE": os.environ["CAPRAY_CACHE"]}})
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app_from_config(cfg), name="capray-bench", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        overhead, direct = latency(url, photos, rgbs, cfg, args.reps)
        print(f"sync over HTTP minus the server's engine time, {args.reps} requests: "
              f"p50 {percentile(overhead, 50):.1f} ms, p95 {percentile(overhead, 95):.1f} ms "
              f"(direct in-process engine call: median {statistics.median(direct):.0f} ms)", flush=True)
        t0 = time.perf_counter()
        ok, errors, lost = concurrent(url, photos, args.clients, args.jobs, args.timeout)
        print(f"{args.clients} clients x {args.jobs} jobs: {ok} ok, {errors} errors, {lost} lost "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"RESULT serve_latency overhead_p50_ms={percentile(overhead, 50):.1f} "
          f"overhead_p95_ms={percentile(overhead, 95):.1f} concurrent={args.clients} errors={errors} lost={lost}")


if __name__ == "__main__":
    main()
