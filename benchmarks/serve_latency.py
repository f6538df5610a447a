"""What the online endpoint adds to an engine call, and whether concurrent clients lose anything.

1. Latency overhead. The same smoke-preset group (2 photos) is protected `--reps` times through
   `POST /v1/protect:sync` over HTTP on 127.0.0.1 (API key, streamed body, decode, Protector call,
   PNG encode, JSON) and, interleaved, by the same `capray.Protector` call in this process.
   Each HTTP request's overhead is its wall time minus the engine time the server measured for that
   very call (`engine_seconds`: the wall time of `protect_arrays` inside the Protector), so the
   engine's own run-to-run noise on a shared CPU does not enter the difference; the in-process direct
   call's median is printed beside it as a cross-check.
2. Concurrency. `--clients` threads (at most the server's pending-job capacity, loopback only) each
   submit `--jobs` jobs and poll them to the end, bounded by `--timeout` seconds. errors = refused
   submissions or failed jobs; lost = jobs that are unknown (404) or still pending at the deadline.

Last line: RESULT serve_latency overhead_p50_ms=<m> overhead_p95_ms=<m> concurrent=<n> errors=<e> lost=<l>
Targets: p50 overhead ≤ 50 ms; zero errors and zero lost jobs below the queue bound. CPU-only numbers here.
"""

from __future__ import annotations

import argparse
import base64
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
KEY = "benchmark-key"


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


def latency(url: str, body: dict, rgbs: list[np.ndarray], cfg, reps: int) -> tuple[list[float], list[float]]:
    """(per-request overhead ms, direct in-process engine ms), interleaved."""
    import httpx
    import torch

    from capray import Protector

    torch.set_num_threads(1)  # as in the one-CPU Protector replica
    protector = Protector.from_config(cfg)
    overhead, direct = [], []
    with httpx.Client(base_url=url, timeout=300, headers={"Authorization": f"Bearer {KEY}"}) as client:
        client.post("/v1/protect:sync", json=body).raise_for_status()  # warm-up: first call paths
        protector(rgbs, "alice")
        for _ in range(reps):
            t0 = time.perf_counter()
            resp = client.post("/v1/protect:sync", json=body)
            wall = time.perf_counter() - t0
            resp.raise_for_status()
            overhead.append((wall - resp.json()["engine_seconds"]) * 1000)
            t0 = time.perf_counter()
            protector(rgbs, "alice")
            direct.append((time.perf_counter() - t0) * 1000)
    return overhead, direct


def concurrent(url: str, body: dict, clients: int, jobs: int, timeout: float) -> tuple[int, int, int]:
    """(jobs ok, errors, lost) for `clients` threads each submitting and polling `jobs` jobs."""
    import httpx

    deadline = time.monotonic() + timeout
    counts = {"ok": 0, "errors": 0, "lost": 0}
    lock = threading.Lock()

    def client_loop() -> None:
        with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as client:
            ids = []
            for _ in range(jobs):
                resp = client.post("/v1/protect", json=body)
                if resp.status_code == 202:
                    ids.append(resp.json()["job_id"])
                else:
                    with lock:
                        counts["errors"] += 1
            for job_id in ids:
                outcome = "lost"
                while time.monotonic() < deadline:
                    resp = client.get(f"/v1/jobs/{job_id}")
                    if resp.status_code != 200:
                        break  # unknown: lost
                    status = resp.json()["status"]
                    if status != "pending":
                        outcome = "ok" if status == "ok" else "errors"
                        break
                    time.sleep(0.25)
                with lock:
                    counts[outcome] += 1

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
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
    (work / "keys").write_text(KEY + "\n")
    os.environ.setdefault("CAPRAY_CACHE", str(work / "cache"))
    cfg = load_config(preset="smoke", overrides={"model": {"sd": "tiny"}, "serve": {
        "min_replicas": 1, "max_replicas": 1, "gpus_per_replica": 0, "cpus_per_replica": 1, "ingress_cpus": 0,
        "store": str(work / "store"), "api_keys_file": str(work / "keys")}})
    if not 1 <= args.clients <= cfg.serve.capacity:
        parser.error(f"--clients must be 1..{cfg.serve.capacity} (the server's pending-job capacity)")
    rgbs = [photo(64, 64, 1), photo(64, 64, 2)]
    body = {"identity": "alice", "photos": [{"name": f"p{i}.png", "data": base64.b64encode(png(a)).decode()}
                                            for i, a in enumerate(rgbs)]}
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
        overhead, direct = latency(url, body, rgbs, cfg, args.reps)
        print(f"sync over HTTP minus the server's engine time, {args.reps} requests: "
              f"p50 {percentile(overhead, 50):.1f} ms, p95 {percentile(overhead, 95):.1f} ms "
              f"(direct in-process engine call: median {statistics.median(direct):.0f} ms)", flush=True)
        t0 = time.perf_counter()
        ok, errors, lost = concurrent(url, body, args.clients, args.jobs, args.timeout)
        print(f"{args.clients} clients x {args.jobs} jobs: {ok} ok, {errors} errors, {lost} lost "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"RESULT serve_latency overhead_p50_ms={percentile(overhead, 50):.1f} "
          f"overhead_p95_ms={percentile(overhead, 95):.1f} concurrent={args.clients} errors={errors} lost={lost}")


if __name__ == "__main__":
    main()
