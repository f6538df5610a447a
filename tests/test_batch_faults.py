"""Faults that need their own Ray: the driver SIGKILLed mid-run and rerun, and a worker node removed
mid-run from a multi-node `ray.cluster_utils.Cluster`. Each runs in a subprocess (one Ray per process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SETS = ["--preset", "smoke", "--set", "model.sd=tiny", "--set", "attack.outer_loops=1", "--set", "attack.adv_steps=2",
        "--set", "batch.cpus_per_actor=0.25", "--set", "batch.records_per_commit=2"]
CLI = ("import argparse, sys; from capray.batch import command; p = argparse.ArgumentParser(); "
       "command.add_arguments(p); sys.exit(command.run(p.parse_args(sys.argv[1:])))")


def make_identities(root: Path, n: int, photos: int = 2, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    names = [f"person {i:02d}" for i in range(n)]
    for name in names:
        (root / name).mkdir(parents=True)
        for j in range(photos):
            Image.fromarray(rng.integers(0, 256, (40, 40 + 4 * j, 3), dtype=np.uint8)).save(root / name / f"{j}.png")
    return names


def env(capray_cache) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    e.update(CAPRAY_CACHE=str(capray_cache), RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    return e


def check_complete(out: Path, names: list[str], photos: int) -> None:
    import pyarrow.parquet as pq

    rows = pq.read_table(out / "manifest").to_pylist()  # compacted: the folder as any reader sees it
    assert sorted(r["identity"] for r in rows) == sorted(names), "missing or duplicated identities"
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["status"] != "ok"]
    for r in rows:
        assert len(r["output_uris"]) == photos
        for uri in r["output_uris"]:
            Image.open(uri).load()  # every PNG is whole
    pngs = [p for p in out.rglob("*.png")]
    assert len(pngs) == len(names) * photos
    assert not list(out.rglob(".capray-tmp-*"))


def test_driver_sigkill_then_rerun_finishes_each_identity_exactly_once(tiny_model_dir, capray_cache, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    names = make_identities(src, 6)
    cmd = [sys.executable, "-c", CLI, str(src), str(out), *SETS, "--quiet"]
    proc = subprocess.Popen(cmd, env=env(capray_cache), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=False)
    deadline = time.time() + 240
    manifest, states = out / "manifest", out / "manifest" / "_state"

    def committed() -> int:
        return len(list(states.glob("*.json"))) if states.exists() else 0

    while time.time() < deadline and proc.poll() is None:
        if committed() >= 2:  # at least one batched commit (2 identities per record file) is in
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = committed()
    assert 2 <= done < 6
    # right after the kill: whatever carries a final name is whole (PNGs decode, record files read)
    import pyarrow.parquet as pq

    for png in out.rglob("*.png"):
        Image.open(png).load()
    parts = list(manifest.glob("part-*.parquet"))
    assert parts and all(1 <= pq.read_table(p).num_rows <= 2 for p in parts)
    assert sum(pq.read_table(p).num_rows for p in parts) >= done  # every state follows its record file
    time.sleep(2)  # let Ray's reaper take down the orphaned local cluster
    rerun = subprocess.run(cmd, env=env(capray_cache), capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()[-3000:]
    import re

    skipped = int(re.search(r"(\d+) already ok", rerun.stderr.decode()).group(1))
    assert done <= skipped < 6, "the rerun must skip every identity committed before the kill"
    check_complete(out, names, 2)


NODE_SCRIPT = textwrap.dedent("""
    import sys, json
    import ray
    from ray.cluster_utils import Cluster
    from capray.batch.command import protect
    from capray.config import load_config

    src, out = sys.argv[1], sys.argv[2]
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "object_store_memory": 80 * 1024**2, "include_dashboard": False})
    doomed = cluster.add_node(num_cpus=2, resources={"protect": 1}, object_store_memory=80 * 1024**2)
    ray.init(address=cluster.address, log_to_driver=False)
    cfg = load_config(preset="smoke", overrides={"attack": {"outer_loops": 1, "adv_steps": 2},
        "batch": {"cpus_per_actor": 0.5, "actor_resources": {"protect": 1}}})
    events = []

    def on_result(summary):
        events.append(summary["identity"])
        if len(events) == 1:  # mid-run: a replacement node joins and the actor's node goes away
            cluster.add_node(num_cpus=2, resources={"protect": 1}, object_store_memory=80 * 1024**2)
            cluster.remove_node(doomed)
            events.append("REMOVED")

    result = protect(src, out, cfg, show_progress=False, on_result=on_result)
    print("RESULT " + json.dumps({"ok": result.ok, "failed": result.failed, "unfinished": result.unfinished,
                                  "events": events}))
    ray.shutdown()
    cluster.shutdown()
""")


def test_worker_node_removed_mid_run_job_completes(tiny_model_dir, capray_cache, tmp_path):
    import json

    src, out = tmp_path / "in", tmp_path / "out"
    names = make_identities(src, 5, seed=1)
    script = tmp_path / "node_removal.py"
    script.write_text(NODE_SCRIPT)
    run = subprocess.run([sys.executable, str(script), str(src), str(out)], env=env(capray_cache),
                         capture_output=True, timeout=400)
    lines = [ln for ln in run.stdout.decode().splitlines() if ln.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr.decode()[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert "REMOVED" in result["events"] and result["events"].index("REMOVED") < len(result["events"]) - 1
    assert (result["ok"], result["failed"], result["unfinished"]) == (5, 0, 0)
    check_complete(out, names, 2)
