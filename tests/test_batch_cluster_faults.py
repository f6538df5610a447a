"""The bulk job under the faults a real cluster sees (issue 11): resources requested as configured, bounded
attempts across actor deaths, a per-group watchdog, sick actors replaced, no silent drops, storage retries,
one writer per OUTPUT (lease), unique output folders and the manifest URI allowlist.

Unit tests run without Ray; the pipeline tests use the session's local Ray (marked `ray`), the slow ones
(several actor restarts each) are also marked `slow`."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capray.batch.demo import SAMPLES
from capray.config import deep_merge, load_config

CHEAP = {"attack": {"outer_loops": 1, "adv_steps": 2},
         "batch": {"cpus_per_actor": 0.25, "cpus_per_io_task": 0.5, "gpus_per_actor": 0}}


def cheap_config(**extra):
    return load_config(preset="smoke", overrides=deep_merge(CHEAP, extra))


def copy_samples(root: Path, *names: str) -> None:
    for name in names:
        shutil.copytree(SAMPLES / name, root / name)


def rows_by_identity(out: Path) -> dict[str, dict]:
    from capray.io.manifest import read_manifest

    return {r["identity"]: r for r in read_manifest(str(out)).to_pylist()}


# -- 1. resources as configured ---------------------------------------------------------------------------

def _actor_remote_args(ds) -> dict:
    """The Ray remote args of the dataset's actor-pool stage, read from its logical plan (nothing runs)."""
    from ray.data._internal.compute import ActorPoolStrategy

    found = [op.ray_remote_args for op in ds._logical_plan.dag.post_order_iter()
             if isinstance(getattr(op, "compute", None), ActorPoolStrategy)]
    assert len(found) == 1
    return found[0]


@pytest.mark.ray
def test_actors_request_the_configured_gpus_on_a_cluster_without_gpus(ray_cluster, tmp_path):
    import ray

    from capray.batch.plan import make_plan
    from capray.batch.processor import Processor

    def build_dataset(plan, cfg):  # a slice's Dataset as `capray protect` builds it, unexecuted
        return Processor(cfg, plan)(ray.data.from_items([{"identity": "coffee", "uris": []}]))

    assert ray_cluster.cluster_resources().get("GPU", 0) == 0  # like a GPU group scaled to zero
    copy_samples(tmp_path / "in", "coffee")
    cfg = load_config(preset="smoke", overrides={"batch": {"gpus_per_actor": 1, "actor_resources": {"protect": 1}}})
    plan = make_plan(str(tmp_path / "in"), str(tmp_path / "out"), cfg)
    args = _actor_remote_args(build_dataset(plan, cfg))
    assert args["num_gpus"] == 1 and args["resources"] == {"protect": 1}
    assert args["num_cpus"] == cfg.batch.cpus_per_actor
    half = cfg.model_copy(update={"batch": cfg.batch.model_copy(update={"gpus_per_actor": 0.5})})
    assert _actor_remote_args(build_dataset(plan, half))["num_gpus"] == 0.5


def test_only_the_embedded_local_ray_falls_back_to_cpu(monkeypatch, caplog):
    import torch

    from capray.batch.resources import embedded_cpu_fallback

    cfg = load_config(preset="smoke")
    assert cfg.batch.gpus_per_actor == 1
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert embedded_cpu_fallback(cfg, "ray://head:10001") is cfg  # a cluster: as configured
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert embedded_cpu_fallback(cfg, None) is cfg
    monkeypatch.delenv("RAY_ADDRESS")
    local = embedded_cpu_fallback(cfg, None)
    assert local.batch.gpus_per_actor == 0 and "on the CPU" in caplog.text
    assert local.config_hash() == cfg.config_hash()  # a batch setting: same pixels, resumable
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert embedded_cpu_fallback(cfg, None) is cfg


# -- 2. bounded attempts, watchdog, sick actors (logic, in process) -------------------------------------------

class Replaced(BaseException):
    """Stands in for the process ending (os._exit) in the in-process tests: nothing after it runs."""


def fake_actor(cfg, engine):
    """A ProtectStage without models whose engine is `engine(identity)`; `end_process` raises Replaced."""
    from capray.attack.api import ProtectionRecord
    from capray.batch.stages import ProtectStage

    class Actor(ProtectStage):
        def load_protector(self):
            return None

        def run_engine(self, rgbs, identity, fixed=()):
            engine(identity)
            return [a + 1 for a in rgbs], ProtectionRecord.unprotected(cfg, identity)

        def end_process(self, reason):
            raise Replaced(reason)

    return Actor(cfg.model_dump_json())


def group_row(identity: str) -> dict:
    return {"identity": identity, "pixels": [bytes(12)], "shapes": [[2, 2]], "error": None}


def test_engine_errors_are_retried_then_recorded_with_the_reason():
    cfg = cheap_config(batch={"group_retries": 2, "actor_error_limit": 10})
    calls = []

    def engine(identity):
        calls.append(identity)
        raise RuntimeError("out of host memory")

    out = fake_actor(cfg, engine).process(group_row("a"))
    assert calls == ["a"] * 3 and out["attempts"] == 3 and out["pixels"] is None
    assert out["error"] == "protection failed after 3 attempts: RuntimeError: out of host memory"


def test_a_sticky_device_error_replaces_the_actor_and_the_attempt_count_survives_it():
    from capray.batch.attempts import AttemptLedger

    cfg = cheap_config(batch={"group_retries": 2, "actor_error_limit": 5})
    shared = AttemptLedger()  # the job's ledger, outliving actors

    def cuda_error(identity):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    sick = fake_actor(cfg, cuda_error)
    sick.ledger = shared
    with pytest.raises(Replaced, match="CUDA error"):
        sick.process(group_row("a"))  # replaced after one error, not after actor_error_limit
    healthy = fake_actor(cfg, lambda identity: None)
    healthy.ledger = shared
    out = healthy.process(group_row("a"))  # Ray's retry of the same group on the new actor
    assert out["error"] is None and out["attempts"] == 2 and shared.in_flight() == 0


def test_a_group_that_kills_every_process_fails_after_its_retries():
    from capray.batch.attempts import AttemptLedger

    cfg = cheap_config(batch={"group_retries": 2})
    shared = AttemptLedger()
    for _ in range(3):  # three attempts, each killing its actor (nothing returns)
        assert shared.begin("poison")[0] <= 3
    actor = fake_actor(cfg, lambda identity: pytest.fail("a fourth attempt ran"))
    actor.ledger = shared
    out = actor.process(group_row("poison"))
    assert out["attempts"] == 3 and "after 3 attempts" in out["error"] and "died" in out["error"]


def test_the_watchdog_stops_a_hung_group_and_the_retry_reports_the_timeout():
    from capray.batch.attempts import AttemptLedger

    cfg = cheap_config(batch={"group_timeout_s": 0.5})
    shared, ended = AttemptLedger(), threading.Event()
    def hang(identity):
        ended.wait(30)
        raise Replaced("the process ended")  # what the watchdog's end_process does to this thread

    actor = fake_actor(cfg, hang)
    actor.end_process, actor.ledger = (lambda reason: ended.set()), shared
    started = time.monotonic()
    with pytest.raises(Replaced):
        actor.process(group_row("hang"))
    assert ended.is_set() and time.monotonic() - started < 20
    retry = fake_actor(cfg, lambda identity: pytest.fail("a timed-out group ran again"))
    retry.ledger = shared
    out = retry.process(group_row("hang"))
    assert out["error"].startswith("timed out") and "group_timeout_s=0.5" in out["error"]


# -- 2. the same on Ray: real actor deaths ------------------------------------------------------------------

class PoisonAndHang:
    """Mixin: 'poison' ends its process on every attempt, 'hang' never returns; others run the engine."""

    def run_engine(self, rgbs, identity, fixed=()):
        if identity == "poison":
            os._exit(1)
        if identity == "hang":
            time.sleep(3600)
        return super().run_engine(rgbs, identity, fixed)


class SickFirstActor:
    """Mixin: the first actor process (marker created with O_EXCL) raises a CUDA error on every call."""

    MARKER, PIDS = "", ""

    def run_engine(self, rgbs, identity, fixed=()):
        try:
            os.close(os.open(self.MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            type(self).sick = True
        except FileExistsError:
            pass
        if getattr(type(self), "sick", False):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        with open(self.PIDS, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        return super().run_engine(rgbs, identity, fixed)


@pytest.mark.ray
@pytest.mark.slow
def test_poison_and_hung_groups_fail_alone_and_the_job_finishes(ray_cluster, tmp_path):
    from ray import cloudpickle

    from capray.batch.command import protect
    from capray.batch.stages import ProtectStage

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    src = tmp_path / "in"
    copy_samples(src, "coffee", "chelsea")
    shutil.copytree(SAMPLES / "coffee", src / "poison")
    shutil.copytree(SAMPLES / "coffee", src / "hang")
    cfg = cheap_config(batch={"group_retries": 1, "group_timeout_s": 45, "num_actors": 1})
    actor_cls = type("PoisonActor", (PoisonAndHang, ProtectStage), {})
    summary = protect(str(src), str(tmp_path / "out"), cfg, protect_stage=actor_cls, show_progress=False)
    assert (summary.ok, summary.failed, summary.unfinished) == (2, 2, 0)
    rows = rows_by_identity(tmp_path / "out")
    assert {i: r["status"] for i, r in rows.items()} == {"coffee": "ok", "chelsea": "ok", "poison": "failed",
                                                         "hang": "failed"}
    assert rows["poison"]["attempts"] == 2 and "after 2 attempts" in rows["poison"]["error"]
    assert rows["hang"]["error"].startswith("timed out") and "group_timeout_s=45s" in rows["hang"]["error"]
    assert not (tmp_path / "out" / "poison").exists() and not (tmp_path / "out" / "hang").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_an_actor_with_a_sticky_cuda_error_is_replaced_and_every_group_succeeds(ray_cluster, tmp_path):
    from ray import cloudpickle

    from capray.batch.command import protect
    from capray.batch.stages import ProtectStage

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    src = tmp_path / "in"
    copy_samples(src, "coffee", "chelsea", "astronaut")
    marker, pids = tmp_path / "sick", tmp_path / "healthy-pids"
    actor_cls = type("SickActor", (SickFirstActor, ProtectStage), {"MARKER": str(marker), "PIDS": str(pids)})
    cfg = cheap_config(batch={"group_retries": 2, "actor_error_limit": 5, "num_actors": 1})
    summary = protect(str(src), str(tmp_path / "out"), cfg, protect_stage=actor_cls, show_progress=False)
    assert marker.exists(), "the fault was never injected"
    assert (summary.ok, summary.failed, summary.unfinished) == (3, 0, 0)
    rows = rows_by_identity(tmp_path / "out")
    assert sorted(r["attempts"] for r in rows.values())[-1] == 2  # the group the sick actor had, redone once
    assert len(set(pids.read_text().split())) == 1  # every success came from the replacement process


# -- 3. no silent drops -----------------------------------------------------------------------------------

class DropOne:
    """Mixin: the actor raises for 'dropped' outside the engine's try (a bug in capray, not the engine)."""

    def process(self, row):
        if row["identity"] == "dropped":
            raise TypeError("a bug outside the engine call")
        return super().process(row)


@pytest.mark.ray
@pytest.mark.slow  # a fault run on the real engine; the fast tier's stage tests give failed rows their reasons
def test_an_unexpected_error_gets_a_row_and_an_uncommittable_identity_is_named(ray_cluster, tmp_path, capsys):
    from ray import cloudpickle

    from capray.batch.command import protect
    from capray.batch.stages import ProtectStage
    from capray.io.manifest import state_uri
    from capray.io.naming import safe_name

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    src, out = tmp_path / "in", tmp_path / "out"
    copy_samples(src, "coffee")
    shutil.copytree(SAMPLES / "coffee", src / "dropped")
    shutil.copytree(SAMPLES / "coffee", src / "stuck row")
    Path(state_uri(str(out), safe_name("stuck row"))).mkdir(parents=True)  # its commit cannot finish
    actor_cls = type("DropActor", (DropOne, ProtectStage), {})
    summary = protect(str(src), str(out), cheap_config(), protect_stage=actor_cls, show_progress=False)
    assert (summary.ok, summary.failed, summary.unfinished) == (1, 1, 1) and summary.exit_code == 1
    assert summary.unfinished_identities == ["stuck row"]
    err = capsys.readouterr().err
    assert "unfinished identity 'stuck row': not committed: saving its committed state failed" in err
    rows = rows_by_identity(out)
    assert rows["coffee"]["status"] == "ok"
    assert rows["dropped"]["status"] == "failed" and rows["dropped"]["failure_class"] == "transient"
    assert "unexpected error: TypeError: a bug outside the engine call" in rows["dropped"]["error"]


# -- 4. storage retries -------------------------------------------------------------------------------------

def test_s3_requests_get_botocore_retries_unless_configured():
    from capray.io.storage import S3_RETRIES, with_retry_defaults

    assert with_retry_defaults("s3://b/x", {"key": "k"}) == {"key": "k", "config_kwargs": {"retries": S3_RETRIES}}
    own = {"config_kwargs": {"retries": {"mode": "standard", "max_attempts": 3}, "read_timeout": 5}}
    assert with_retry_defaults("s3://b/x", own) == own
    assert with_retry_defaults("gs://b/x", {}) == {}
    assert S3_RETRIES["max_attempts"] >= 5 and S3_RETRIES["mode"] in ("standard", "adaptive")


def test_transient_errors_are_told_apart_from_missing_or_forbidden_files():
    import errno

    from capray.io.storage import is_transient

    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    assert is_transient(OSError(errno.EBUSY, "SlowDown"))  # what s3fs raises for a throttled request
    assert not is_transient(FileNotFoundError("x")) and not is_transient(PermissionError("x"))
    assert not is_transient(ValueError("not an image"))


def test_a_forbidden_photo_is_a_transient_failure_a_missing_one_an_input_failure(tmp_path, monkeypatch):
    from capray.batch.stages import decode
    from capray.batch.stages.decode import DecodeStage

    copy_samples(tmp_path, "coffee")
    photo, cfg = str(tmp_path / "coffee" / "coffee_1.png"), cheap_config()
    missing = DecodeStage(cfg).process({"identity": "a", "uris": [str(tmp_path / "gone.png")], "problem": None})
    assert missing["failure"] == "input"

    def forbidden(fs, path, max_bytes):
        raise PermissionError(13, "AccessDenied (KMS key not usable by this role)")

    monkeypatch.setattr(decode, "read_bytes", forbidden)  # an IAM/KMS mistake refuses every photo alike
    denied = DecodeStage(cfg).process({"identity": "a", "uris": [photo], "problem": None})
    assert denied["failure"] == "transient" and "AccessDenied" in denied["error"]  # a rerun retries it


def _failed_row(prev_outputs):
    return {"identity": "a", "safe": "a", "uris": [], "stems": [], "error": "identity has no photos",
            "failure": "input", "stamps": [], "prev_stamps": [f"s{i}" for i in range(len(prev_outputs))],
            "prev_outputs": prev_outputs, "prev_known": True}


def test_a_failed_row_carries_the_model_notes_like_an_ok_one(tmp_path):
    from capray.batch.stages.write import write_group
    from capray.io.manifest import ManifestRow

    cfg = cheap_config()
    assert cfg.model.notes, "the smoke preset's tiny model has a note"
    written = write_group(_failed_row([]), cfg, str(tmp_path / "out"))
    row = ManifestRow.model_validate_json(written["row"])
    assert row.status == "failed" and row.notes == list(cfg.model.notes)


def test_removing_stale_outputs_never_touches_files_outside_output(tmp_path, caplog):
    from capray.batch.stages.write import write_group
    from capray.io.manifest import ManifestRow

    out, old = tmp_path / "out", tmp_path / "old-out"  # the state was written when OUTPUT was old-out
    for folder in (out, old):
        (folder / "a").mkdir(parents=True)
        (folder / "a" / "0.png").write_bytes(b"png")
    inside, outside = str(out / "a" / "0.png"), str(old / "a" / "0.png")
    written = write_group(_failed_row([inside, outside]), cheap_config(), str(out))
    assert not (out / "a" / "0.png").exists() and (old / "a" / "0.png").exists()
    assert ManifestRow.model_validate_json(written["row"]).removed_output_uris == [inside]
    assert ManifestRow.model_validate_json(written["row"]).published_uris == []
    assert f"not removing {outside}" in caplog.text


FLAKY_FS = r'''
"""Local files behind a store whose connections reset (in Ray workers only)."""
import os
import threading

import fsspec
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem


class FlakyFileSystem(DirFileSystem):
    """The first read and the first write of every file in a process fail; the next ones work."""
    protocol = "flaky"
    failed_once = set()
    lock = threading.Lock()

    def __init__(self, *args, **kwargs):
        super().__init__(path="/", fs=LocalFileSystem(auto_mkdir=True))

    @classmethod
    def _strip_protocol(cls, path):
        return path[len("flaky://"):] if path.startswith("flaky://") else path

    def _flake(self, what, path):
        if os.environ.get("FLAKY_ON") != "1":
            return
        with self.lock:
            if (what, path) in self.failed_once:
                return
            self.failed_once.add((what, path))
        with open(os.environ["FLAKY_LOG"], "a") as fh:
            fh.write(what + "\n")
        raise ConnectionResetError(f"injected: connection reset during {what}")

    def cat_file(self, path, *a, **k):
        self._flake("read", path)
        return super().cat_file(path, *a, **k)

    def open(self, path, mode="rb", *a, **k):
        self._flake("read" if "r" in mode else "write", path)
        return super().open(path, mode, *a, **k)

    def pipe_file(self, path, *a, **k):
        self._flake("write", path)
        return super().pipe_file(path, *a, **k)


def register():
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)


def setup():  # Ray workers only: the driver's own calls stay reliable
    os.environ["FLAKY_ON"] = "1"
    register()
'''

FLAKY_SCRIPT = r'''
import json, sys
import ray
import flakyfs

flakyfs.register()
src, out = sys.argv[1], sys.argv[2]
ray.init(address="local", num_cpus=4, object_store_memory=150 * 1024**2, include_dashboard=False,
         log_to_driver=False, runtime_env={"worker_process_setup_hook": "flakyfs.setup"})
from capray.batch.command import protect
from capray.config import load_config
# io_retries: each distinct file a task touches (PNGs, records, states, OUTPUT's lease) fails once per process
cfg = load_config(preset="smoke", overrides={"attack": {"outer_loops": 1, "adv_steps": 2},
    "batch": {"cpus_per_actor": 0.5, "gpus_per_actor": 0, "io_retries": 10}})
s = protect("flaky://" + src, "flaky://" + out, cfg, show_progress=False)
print("RESULT " + json.dumps({"ok": s.ok, "failed": s.failed, "unfinished": s.unfinished}))
ray.shutdown()
'''


@pytest.mark.ray
@pytest.mark.slow
def test_transient_storage_errors_are_retried_and_nothing_is_lost(tiny_model_dir, capray_cache, tmp_path):
    import json
    import subprocess

    from capray.io.manifest import read_manifest

    src, out = tmp_path / "in", tmp_path / "out"
    copy_samples(src, "coffee", "chelsea")
    script, log = tmp_path / "flaky.py", tmp_path / "injected.log"
    script.write_text(FLAKY_SCRIPT)
    (tmp_path / "flakyfs.py").write_text(FLAKY_FS)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(CAPRAY_CACHE=str(capray_cache), RAY_USAGE_STATS_ENABLED="0", FLAKY_LOG=str(log),
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(Path(__file__).resolve().parents[1])]))
    run = subprocess.run([sys.executable, str(script), str(src), str(out)], env=env, capture_output=True,
                         timeout=400)
    lines = [ln for ln in run.stdout.decode().splitlines() if ln.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr.decode()[-3000:]
    assert json.loads(lines[-1][7:]) == {"ok": 2, "failed": 0, "unfinished": 0}
    injected = log.read_text().split("\n")
    assert "read" in injected and "write" in injected  # decode and write both met (and survived) errors
    rows = read_manifest(str(out)).to_pylist()
    assert sorted(r["identity"] for r in rows) == ["chelsea", "coffee"] and all(r["status"] == "ok" for r in rows)
    for r in rows:
        for uri in r["output_uris"]:
            Image.open(uri[len("flaky://"):] if uri.startswith("flaky://") else uri).load()


# -- 5. one writer per OUTPUT -------------------------------------------------------------------------------

def test_a_second_job_on_the_same_output_is_refused_naming_the_holder(tmp_path):
    from capray.batch.lease import LEASE_FILE, LeaseHeld, acquire

    out = str(tmp_path / "out")
    first = acquire(out, ttl_s=30)
    with pytest.raises(LeaseHeld, match=f"job {first.job_id} on host .*pid {os.getpid()}"):
        acquire(out, ttl_s=30)
    first.release()
    assert not (tmp_path / "out" / LEASE_FILE).exists()
    acquire(out, ttl_s=30).release()  # free again once released


def test_concurrent_jobs_get_exactly_one_lease(tmp_path):
    from capray.batch.lease import LeaseHeld, acquire

    out, got, refused = str(tmp_path / "out"), [], []
    start = threading.Barrier(8)

    def contend():
        start.wait()
        try:
            got.append(acquire(out, ttl_s=30))
        except LeaseHeld:
            refused.append(1)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 1 and len(refused) == 7
    got[0].release()


def test_a_renewed_lease_stays_held_an_abandoned_one_expires_and_force_unlock_takes_over(tmp_path, caplog):
    import json

    from capray.batch.lease import LEASE_FILE, LeaseHeld, acquire

    out, lease_file = str(tmp_path / "out"), tmp_path / "out" / LEASE_FILE
    live = acquire(out, ttl_s=0.9)
    time.sleep(1.5)  # well past the TTL, but renewed every 0.3 s
    with pytest.raises(LeaseHeld):
        acquire(out, ttl_s=0.9)
    live._stop.set()  # the holder dies (no release, no more renewals)
    live._thread.join()
    time.sleep(1.2)  # its pid (ours) is alive: only the TTL frees it
    taker = acquire(out, ttl_s=0.9)
    assert "not renewed" in caplog.text
    caplog.clear()
    assert not live.renew() and "taken over by job " + taker.job_id in live.lost  # the old holder would stop
    forced = acquire(out, ttl_s=60, force=True)  # --force-unlock: at once
    assert "took over the lease" in caplog.text and "(forced)" in caplog.text
    assert json.loads(lease_file.read_text())["job_id"] == forced.job_id
    taker._stop.set()
    forced.release()
    assert not lease_file.exists()


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    import json
    import subprocess

    from capray.batch.lease import LEASE_FILE, acquire

    out = tmp_path / "out"
    first = acquire(str(out), ttl_s=3600)
    first._stop.set()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    body = json.loads((out / LEASE_FILE).read_text())
    (out / LEASE_FILE).write_text(json.dumps(dict(body, pid=int(dead.stdout))))  # as if killed mid-run
    acquire(str(out), ttl_s=3600).release()


def test_capray_protect_exits_2_naming_the_holder_and_writes_nothing(tmp_path, capsys):
    from capray.batch import command
    from capray.batch.lease import acquire

    copy_samples(tmp_path / "in", "coffee")
    out = tmp_path / "out"
    holder = acquire(str(out), ttl_s=60)
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "in"), str(out), "--preset", "smoke", "--quiet"])
    assert command.run(args) == 2
    err = capsys.readouterr().err
    assert f"in use by another capray job: job {holder.job_id}" in err and "--force-unlock" in err
    assert sorted(p.name for p in out.iterdir()) == [".capray-lease.json"]
    holder.release()


# -- 6. unique folders ---------------------------------------------------------------------------------------

def test_an_identity_named_like_another_ones_hashed_folder_gets_its_own():
    from capray.io.naming import safe_name

    hashed = safe_name("a b")
    assert hashed.startswith("a_b-") and safe_name(hashed) != hashed
    rng = np.random.default_rng(0)
    names = ["a b", "a_b", hashed, safe_name(hashed), "manifest", safe_name("manifest"), "x" * 200,
             safe_name("x" * 200)] + ["".join(rng.choice(list("ab _-?é"), 4)) for _ in range(400)]
    names = sorted(set(names))
    folders = [safe_name(n) for n in names]
    assert len(set(folders)) == len(names)


def test_an_identity_that_would_take_over_another_ones_folder_fails(tmp_path):
    """The done-check compares the identity recorded in the folder's state (a hash collision, or names
    equal but for case on a case-insensitive store, simulated here by a state written for another name)."""
    from capray.batch.stages import CheckStage
    from capray.io import manifest
    from capray.io.naming import safe_name

    src, out = tmp_path / "in", tmp_path / "out"
    copy_samples(src, "coffee")
    manifest.write_state(str(out), safe_name("coffee"), manifest.IdentityState(identity="Coffee", status="ok"), None)
    check = CheckStage(cheap_config(), str(out), allowed=None, resuming=True)
    candidate = {"identity": "coffee", "uris": [str(p) for p in sorted((src / "coffee").iterdir())]}
    row = check.process(candidate)
    assert "share the output folder 'coffee'" in row["problem"] and "'Coffee'" in row["problem"]
    swept = check.process(dict(candidate, state_attached=True, prev_state=None))  # new to a nightly sweep
    assert "share the output folder 'coffee'" in swept["problem"]
    assert row["failure"] == manifest.FAILURE_INPUT and row["safe"] != safe_name("coffee")  # its row lands elsewhere
    manifest.write_state(str(out), safe_name("coffee"), manifest.IdentityState(identity="coffee", status="failed",
                                                                                failure_class="transient"), None)
    assert check.process(candidate)["problem"] is None  # its own folder


# -- 7. URI allowlist ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("uri", ["http://169.254.169.254/latest/meta-data", "s3://other-tenant/a.png",
                                 "zip::s3://photos/x.zip", "s3://photos/tenant-a/../tenant-b/a.png", "file:///etc/passwd",
                                 "/etc/passwd", "gs://photos/a.png"])
def test_manifest_uris_outside_the_input_are_refused(uri):
    from capray.io.allowlist import allowed_prefixes, uri_problem

    prefixes = allowed_prefixes("s3://photos/tenant-a/list.csv", [])
    assert prefixes == ["s3://photos/tenant-a"]  # the manifest's folder, not the whole (shared) bucket
    assert uri_problem(uri, prefixes) is not None
    assert uri_problem("s3://photos/tenant-a/lib/alice/1.png", prefixes) is None
    assert uri_problem("s3://photos/tenant-b/alice/1.png", prefixes) is not None  # another tenant's photos
    assert uri_problem("s3://photos/tenant-a-evil/a.png", prefixes) is not None  # whole segments only


def test_allowed_input_prefixes_widen_the_default():
    from capray.io.allowlist import allowed_prefixes, uri_problem

    prefixes = allowed_prefixes("/data/m.csv", ["s3://shared-photos/public"])
    assert uri_problem("/data/lib/a.png", prefixes) is None
    assert uri_problem("/data2/a.png", prefixes) is not None
    assert uri_problem("s3://shared-photos/public/a.png", prefixes) is None
    assert uri_problem("s3://shared-photos/private/a.png", prefixes) is not None


def test_a_manifest_row_outside_the_prefix_fails_its_identity_only(tmp_path):
    from capray.batch.plan import make_plan
    from capray.batch.stages import DecodeStage
    from capray.io.allowlist import allowed_prefixes

    lib, secret = tmp_path / "lib", tmp_path / "secret"
    copy_samples(lib, "coffee")
    copy_samples(secret, "chelsea")
    manifest = lib / "list.csv"
    manifest.write_text(f"identity,uri\ncoffee,coffee/coffee_1.png\nthief,{secret}/chelsea/chelsea_1.png\n")
    cfg = cheap_config()
    plan = make_plan(str(manifest), str(tmp_path / "out"), cfg)
    allowed = allowed_prefixes(plan.input, cfg.batch.allowed_input_prefixes)
    rows = {"coffee": str(lib / "coffee" / "coffee_1.png"), "thief": str(secret / "chelsea" / "chelsea_1.png")}
    decoded = {i: DecodeStage(cfg, allowed).process({"identity": i, "uris": [u], "problem": None})
               for i, u in rows.items()}
    assert decoded["coffee"].get("error") is None and decoded["coffee"]["pixels"]
    err = decoded["thief"]["error"]
    assert "outside the allowed input locations" in err and "batch.allowed_input_prefixes" in err
    assert decoded["thief"].get("pixels") is None  # nothing was read


def test_the_check_stage_refuses_uris_outside_the_prefix_before_any_request(tmp_path, monkeypatch):
    import pyarrow as pa

    from capray.batch.rows import CANDIDATE_SCHEMA
    from capray.batch.stages import CheckStage, DecodeStage, check
    from capray.io.allowlist import allowed_prefixes

    lib = tmp_path / "lib"
    copy_samples(lib, "coffee")
    good = str(lib / "coffee" / "coffee_1.png")
    bad = {"metadata": "http://169.254.169.254/latest/meta-data", "local": "file:///etc/passwd",
           "tenant": "s3://other-tenant/a.png", "chained": "zip://a.png::s3://photos/x.zip"}
    requested, real = [], check.get_fs
    monkeypatch.setattr(check, "get_fs", lambda uri, so=None: requested.append(uri) or real(uri, so))
    candidates = [{"identity": "coffee", "uris": [good], "sizes": [None], "versions": [None]}] + [
        {"identity": name, "uris": [good, uri], "sizes": [None, None], "versions": [None, None]}
        for name, uri in bad.items()]  # no size/ETag: the check would stat each photo
    cfg = cheap_config()
    stage = CheckStage(cfg, str(tmp_path / "out"), resuming=False,
                       allowed=allowed_prefixes(str(lib / "list.csv"), cfg.batch.allowed_input_prefixes))
    table = stage(pa.Table.from_pylist(candidates, schema=CANDIDATE_SCHEMA))
    planned = {r["identity"]: r for r in table.to_pylist()}
    assert requested == [good], "a refused URI (or its identity's other photos) was requested"
    assert planned["coffee"]["problem"] is None and planned["coffee"]["failure"] is None
    for name, uri in bad.items():
        row = planned[name]
        assert row["failure"] == "input" and repr(uri) in row["problem"], row["problem"]
        assert "1 of 2 photo URIs refused; nothing read for this identity" in row["problem"]
        assert row["fingerprint"]  # unchanged input is skipped by the next run's done-check, not retried
        decoded = DecodeStage(cfg).process(row)
        assert decoded["failure"] == "input" and decoded.get("pixels") is None


@pytest.mark.s3
def test_on_s3_the_lease_is_a_conditional_create_and_retries_are_configured(moto_s3):
    from capray.batch.lease import LEASE_FILE, LeaseHeld, acquire
    from capray.io.lease import S3Backend, backend_for
    from capray.io.storage import S3_RETRIES, get_fs

    options = moto_s3.bucket("leases")
    fs, _ = get_fs("s3://leases/out", options)
    assert fs.config_kwargs["retries"] == S3_RETRIES  # botocore's retry mode reaches the client
    race = backend_for(f"s3://leases/race/{LEASE_FILE}", options)
    assert isinstance(race, S3Backend) and race.create(b'{"holder": "a"}')
    assert race.create(b'{"holder": "b"}') is None  # If-None-Match: * refused it
    held = acquire("s3://leases/out", 60, options)
    with pytest.raises(LeaseHeld, match=held.job_id):
        acquire("s3://leases/out", 60, options)
    held.release()
    assert not fs.exists(f"leases/out/{LEASE_FILE}")


def test_force_unlock_takes_a_held_output_over_and_the_old_holder_finds_out(ray_cluster, tmp_path, caplog):
    from capray.batch import command
    from capray.batch.lease import acquire

    (tmp_path / "in").mkdir()  # no identities: the run needs no cluster, only the lease and run.json
    out = tmp_path / "out"
    holder = acquire(str(out), ttl_s=600)
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    argv = [str(tmp_path / "in"), str(out), "--preset", "smoke", "--quiet"]
    assert command.run(parser.parse_args(argv)) == 2
    assert command.run(parser.parse_args(argv + ["--force-unlock"])) == 0
    assert "took over the lease" in caplog.text and "(forced)" in caplog.text
    assert (out / "run.json").exists() and not (out / ".capray-lease.json").exists()  # released at the end
    assert not holder.renew() and "taken over" in holder.lost
    holder._stop.set()


def test_a_job_whose_lease_is_taken_over_is_told_to_stop(tmp_path):
    from capray.batch.lease import acquire

    out, told = str(tmp_path / "out"), threading.Event()
    first = acquire(out, ttl_s=0.6, on_lost=told.set)  # the command passes _thread.interrupt_main
    second = acquire(out, ttl_s=60, force=True)
    assert told.wait(5) and "taken over by job " + second.job_id in first.lost
    first.release()  # does not delete the new holder's lease
    assert (tmp_path / "out" / ".capray-lease.json").exists()
    second.release()
