"""The nightly cycle: slices, stops that resume with nothing redone, deletions, split identities, an
unreadable run.json, quarantine, the group pixel budget, and compaction in proportion to change."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capray.batch.stages import ProtectStage
from capray.io import manifest

from batch_helpers import config, save

pytestmark = pytest.mark.ray

BROKEN = "broken"  # the stand-in fails this identity like a device error, every time


class StandIn(ProtectStage):
    """No models: each photo comes back +1 (mod 256); every call is logged to LOG (the actors run on
    this node: same file), after DELAY_S."""

    LOG = ""
    DELAY_S = 0.0

    def load_protector(self):
        return None

    def run_engine(self, rgbs, identity, fixed=()):
        from capray.attack.api import ProtectionRecord

        with open(self.LOG, "a") as fh:
            fh.write(identity + "\n")
        time.sleep(self.DELAY_S)
        if identity == BROKEN:
            raise RuntimeError("CUDA out of memory (injected)")
        return [(a + 1).astype(np.uint8) for a in rgbs], ProtectionRecord.unprotected(self.cfg, identity)


def stand_in(log: Path, delay_s: float = 0.0) -> type:
    """The stand-in logging to `log` (class attributes travel with the class to the actors)."""
    return type("StandIn", (StandIn,), {"LOG": str(log), "DELAY_S": delay_s})


@pytest.fixture(autouse=True)
def _calls(tmp_path):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    log = tmp_path / "engine-calls.txt"
    log.touch()
    return log


def calls(log: Path) -> list[str]:
    return log.read_text().split()


def library(src: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        save(src / name / "a.png", i)


def run(src, out, cfg=None, delay_s: float = 0.0, **kw):
    from capray.batch.command import protect

    log = Path(out).parent / "engine-calls.txt"
    return protect(str(src), str(out), cfg or config(), show_progress=False, protect_stage=stand_in(log, delay_s),
                   **kw)


def latest(out: Path) -> dict[str, dict]:
    return {r["identity"]: r for r in manifest.read_manifest(str(out)).to_pylist()}


@pytest.mark.slow  # a whole multi-run scenario (~15-30 s): the fast tier keeps its cheaper siblings
def test_slices_cover_the_library_and_a_sigterm_stops_cleanly_and_resumes_with_nothing_redone(
        ray_cluster, tmp_path, _calls):
    names = [f"id{i}" for i in range(8)]
    src, out = tmp_path / "in", tmp_path / "out"
    library(src, names)
    cfg = config(slice_identities=3, num_actors=1, stop_grace_s=60)
    committed: list[str] = []

    def on_result(summary):
        committed.append(summary["identity"])
        if len(committed) == 1:  # a pod being stopped, mid-run
            os.kill(os.getpid(), signal.SIGTERM)

    handler = signal.getsignal(signal.SIGTERM)
    first = run(src, out, cfg, delay_s=0.4, on_result=on_result)
    assert first.stopped == "SIGTERM received" and first.exit_code == 1
    assert 1 <= first.ok < len(names) and first.failed == 0
    assert signal.getsignal(signal.SIGTERM) is handler  # the run's handler is gone with the run
    totals = json.loads((out / "run.json").read_text())["totals"]
    assert totals["stopped"] == "SIGTERM received" and not totals["sweep_finished"]
    done_first = set(latest(out))
    assert done_first == set(committed) and len(calls(_calls)) == len(done_first)  # none started after the stop

    second = run(src, out, cfg)
    assert second.exit_code == 0 and second.stopped is None
    assert second.ok == len(names) - len(done_first)
    assert sorted(calls(_calls)) == sorted(names)  # every identity protected exactly once over both runs
    assert set(latest(out)) == set(names) and all(r["status"] == "ok" for r in latest(out).values())


@pytest.mark.slow  # a whole multi-run scenario (~15-30 s): the fast tier keeps its cheaper siblings
def test_a_time_box_stops_the_run_and_the_next_continues_after_where_it_stopped(ray_cluster, tmp_path, _calls):
    names = [f"id{i}" for i in range(6)]
    src, out = tmp_path / "in", tmp_path / "out"
    library(src, names)
    boxed = config(slice_identities=2, num_actors=1, max_run_seconds=0.1, stop_grace_s=30)
    first = run(src, out, boxed, delay_s=0.4)
    assert first.exit_code == 1 and first.stopped.startswith("time box reached")
    cursor = json.loads((out / "manifest" / "_sweep.json").read_text()) if (
        out / "manifest" / "_sweep.json").exists() else {"after": None}
    second = run(src, out, config(slice_identities=2))
    assert second.exit_code == 0 and sorted(calls(_calls)) == sorted(names)
    order = calls(_calls)[first.ok:]
    if cursor["after"] is not None:  # the next run starts after the cursor and wraps around
        assert order[0] > cursor["after"]


@pytest.mark.slow  # a whole multi-run scenario (~15-30 s): the fast tier keeps its cheaper siblings
def test_a_deleted_identity_has_its_outputs_removed_and_recorded(ray_cluster, tmp_path, _calls):
    import shutil

    src, out = tmp_path / "in", tmp_path / "out"
    library(src, ["alice", "bob", "carol"])
    assert run(src, out).ok == 3
    assert (out / "bob" / "a.png").exists()
    shutil.rmtree(src / "bob")  # a deletion request
    again = run(src, out)
    assert again.deleted == 1 and again.ok == 0 and again.exit_code == 0
    assert not (out / "bob").exists() or not any((out / "bob").iterdir())
    bob = latest(out)["bob"]
    assert bob["status"] == "deleted" and bob["removed_output_uris"] == [str(out / "bob" / "a.png")]
    assert bob["published_uris"] == [] and (out / "alice" / "a.png").exists()
    assert not (out / "manifest" / "_state" / "bob.json").exists()
    third = run(src, out)  # recorded once: nothing to do any more
    assert third.deleted == 0 and third.ok == 0 and third.skipped == 2
    library(src, ["bob"])  # back again: protected anew
    assert run(src, out).ok == 1 and latest(out)["bob"]["status"] == "ok"


def test_an_identity_split_across_two_catalog_files_is_refused_for_its_input(ray_cluster, tmp_path, _calls):
    src, out = tmp_path / "in", tmp_path / "out"
    library(src, ["alice", "bob", "carol"])
    save(src / "bob" / "b.png", 9)
    export = tmp_path / "export"
    export.mkdir()
    # a size-split export whose boundary falls inside bob
    pq.write_table(pa.table({"identity": ["alice", "bob"], "uri": [str(src / "alice/a.png"), str(src / "bob/a.png")]}),
                   export / "part-0.parquet")
    pq.write_table(pa.table({"identity": ["bob", "carol"], "uri": [str(src / "bob/b.png"), str(src / "carol/a.png")]}),
                   export / "part-1.parquet")
    summary = run(str(export / "part-*.parquet"), out, config(allowed_input_prefixes=[str(src)]))
    assert summary.ok == 2 and summary.failed == summary.failed_input == 1
    bob = latest(out)["bob"]
    assert bob["failure_class"] == "input" and "part-0.parquet" in bob["error"] and "part-1.parquet" in bob["error"]
    assert "bob" not in calls(_calls) and not (out / "bob").exists()


def test_an_unreadable_run_file_stops_the_job_with_exit_2_naming_it(ray_cluster, tmp_path, capsys):
    from capray.cli import main

    src, out = tmp_path / "in", tmp_path / "out"
    library(src, ["alice"])
    assert run(src, out).ok == 1
    (out / "run.json").write_text("{ hand edited")
    before = (out / "alice" / "a.png").read_bytes()
    code = main(["protect", str(src), str(out), "--preset", "smoke", "--model", "tiny", "--quiet"])
    assert code == 2 and "run.json" in capsys.readouterr().err
    assert (out / "run.json").read_text() == "{ hand edited" and (out / "alice" / "a.png").read_bytes() == before


@pytest.mark.slow  # a whole multi-run scenario (~15-30 s): the fast tier keeps its cheaper siblings
def test_transient_failures_in_a_row_quarantine_an_identity_until_retried(ray_cluster, tmp_path, _calls):
    src, out = tmp_path / "in", tmp_path / "out"
    library(src, ["alice", BROKEN])
    cfg = config(quarantine_after=2)
    for n in (1, 2):
        summary = run(src, out, cfg)
        assert summary.failed == 1 and summary.quarantined == 0 and summary.exit_code == 1
        assert latest(out)[BROKEN]["transient_failures"] == n
    third = run(src, out, cfg)  # quarantined: skipped, shown, no GPU spent on it
    assert third.quarantined == 1 and third.failed == 0 and third.exit_code == 0
    assert calls(_calls).count(BROKEN) == 2
    retried = run(src, out, config(quarantine_after=2, retry_quarantined=True))
    assert retried.failed == 1 and calls(_calls).count(BROKEN) == 3
    save(src / BROKEN / "a.png", 99)  # a changed input is tried again without the flag
    assert run(src, out, cfg).failed == 1 and calls(_calls).count(BROKEN) == 4


def test_a_group_over_the_pixel_budget_fails_for_its_input_before_the_engine(ray_cluster, tmp_path, _calls):
    src, out = tmp_path / "in", tmp_path / "out"
    save(src / "small" / "a.png", 1, size=24)
    for k in range(3):
        save(src / "big" / f"{k}.png", k, size=40)  # 3 × 1,600 pixels
    summary = run(src, out, config(max_group_pixels=4000))
    assert summary.ok == 1 and summary.failed_input == 1
    big = latest(out)["big"]
    assert "batch.max_group_pixels=4000" in big["error"] and calls(_calls) == ["small"]


@pytest.mark.slow  # a whole multi-run scenario (~15-30 s): the fast tier keeps its cheaper siblings
def test_a_rerun_writes_a_delta_in_proportion_to_change_and_leaves_the_main_files_alone(ray_cluster, tmp_path):
    names = [f"id{i:02d}" for i in range(30)]
    src, out = tmp_path / "in", tmp_path / "out"
    library(src, names)
    cfg = config(manifest_rows_per_file=10, records_per_commit=4, manifest_delta_ratio=0.2)
    run(src, out, cfg)
    index = manifest.read_index(str(out), {})
    main = {e.file: (out / "manifest" / e.file).read_bytes() for e in index.main}
    assert len(main) >= 2 and not index.deltas and sum(e.rows for e in index.main) == 30
    save(src / "id07" / "a.png", 77)  # one identity in 30 changes
    run(src, out, cfg)
    after = manifest.read_index(str(out), {})
    assert {e.file: (out / "manifest" / e.file).read_bytes() for e in after.main} == main  # untouched
    assert [e.rows for e in after.deltas] == [1]
    totals = json.loads((out / "run.json").read_text())["totals"]["compaction"]
    assert not totals["full"] and totals["bytes_written"] < totals["manifest_bytes"] / 2  # (30 rows: mostly footers)
    assert latest(out)["id07"]["finished_at"] > max(r["finished_at"] for k, r in latest(out).items() if k != "id07")
    # deltas past the ratio are merged into new main files, one row per identity
    for name in names[:8]:
        save(src / name / "a.png", 500 + int(name[2:]))
    run(src, out, cfg)
    merged = manifest.read_index(str(out), {})
    assert not merged.deltas and sum(e.rows for e in merged.main) == 30
    assert pq.read_table(out / "manifest").num_rows == 30
