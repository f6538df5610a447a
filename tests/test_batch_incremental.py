"""Reruns at library scale, on the shared local Ray with an engine stand-in (the engine is tested elsewhere):
incremental reruns redo exactly what changed, input failures are permanent until the input changes,
transient ones are retried, a manifest split over files, and compaction."""

from __future__ import annotations

import hashlib
import io
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capray.batch.stages import ProtectStage
from capray.io import manifest

from batch_helpers import config, save

pytestmark = pytest.mark.ray

FLAKY = "flaky"


class StandIn(ProtectStage):
    """No models; each photo comes back with every pixel +1 (mod 256), so outputs differ from inputs.
    The identity named FLAKY always raises, like a device error."""

    def load_protector(self):
        return None

    def run_engine(self, rgbs, identity, fixed=()):
        from capray.attack.api import ProtectionRecord

        if identity == FLAKY:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return [(a + 1).astype(np.uint8) for a in rgbs], ProtectionRecord.unprotected(self.cfg, identity)


@pytest.fixture(autouse=True)
def _pickle_by_value():
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def run(src, out, cfg=None, **kw):
    from capray.batch.command import protect

    return protect(str(src), str(out), cfg or config(), show_progress=False, protect_stage=StandIn, **kw)


def rows(out: Path) -> dict[str, dict]:
    table = pq.read_table(out / "manifest")  # the folder as any reader sees it
    idents = table.column("identity").to_pylist()
    assert len(idents) == len(set(idents)), "an identity has more than one row"
    return {r["identity"]: r for r in table.to_pylist()}


def digest(folder: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.iterdir())}


def pixels(path: Path) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(path.read_bytes())))


def test_incremental_rerun_redoes_exactly_what_changed(ray_cluster, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    for ident, seeds in {"added": [1], "deleted": [2, 3], "replaced": [4, 5], "same": [6, 7]}.items():
        for k, seed in enumerate(seeds):
            save(src / ident / f"{k}.png", seed)
    first = run(src, out)
    assert (first.ok, first.failed, first.exit_code) == (4, 0, 0)
    same_before = digest(out / "same")
    state_before = (out / "manifest" / "_state" / "same.json").stat().st_mtime_ns
    assert np.array_equal(pixels(out / "replaced" / "1.png"), (pixels(src / "replaced" / "1.png") + 1).astype(np.uint8))

    save(src / "added" / "new.png", 8)
    (src / "deleted" / "1.png").unlink()
    save(src / "replaced" / "1.png", 9, size=28)  # replaced in place
    again = run(src, out)
    assert (again.ok, again.failed, again.skipped, again.exit_code) == (3, 0, 1, 0)
    assert digest(out / "same") == same_before, "an unchanged identity was rewritten"
    assert (out / "manifest" / "_state" / "same.json").stat().st_mtime_ns == state_before
    r = rows(out)
    assert sorted(r) == ["added", "deleted", "replaced", "same"] and all(v["status"] == "ok" for v in r.values())
    assert sorted(p.name for p in (out / "added").iterdir()) == ["0.png", "new.png"]
    assert sorted(p.name for p in (out / "deleted").iterdir()) == ["0.png"], "the deleted photo is still published"
    assert r["deleted"]["removed_output_uris"] == [str(out / "deleted" / "1.png")]
    assert pixels(out / "replaced" / "1.png").shape[:2] == (28, 28)
    assert np.array_equal(pixels(out / "replaced" / "1.png"), (pixels(src / "replaced" / "1.png") + 1).astype(np.uint8))
    assert r["same"]["input_fingerprint"] and r["added"]["input_fingerprint"] != r["same"]["input_fingerprint"]

    # every photo of an identity deleted (a deletion request): its outputs go, its row says why
    for p in (src / "deleted").iterdir():
        p.unlink()
    last = run(src, out)
    assert (last.ok, last.failed, last.failed_input, last.skipped) == (0, 1, 1, 3)
    assert list((out / "deleted").iterdir()) == []
    r = rows(out)
    assert r["deleted"]["status"] == "failed" and "no photos" in r["deleted"]["error"]
    assert r["deleted"]["removed_output_uris"] == [str(out / "deleted" / "0.png")]


@pytest.mark.slow  # a whole multi-run scenario (~15-30 s): the fast tier keeps its cheaper siblings
def test_input_failures_are_permanent_until_the_input_changes_transient_ones_retried(ray_cluster, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    save(src / "good" / "1.png", 1)
    save(src / "corrupt" / "1.png", 2)
    (src / "corrupt" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    save(src / FLAKY / "1.png", 3)
    first = run(src, out)
    assert (first.ok, first.failed, first.failed_input, first.exit_code) == (1, 2, 1, 1)
    r = rows(out)
    assert (r["corrupt"]["failure_class"], r[FLAKY]["failure_class"]) == ("input", "transient")
    assert "CUDA error" in r[FLAKY]["error"]

    shutil.rmtree(src / FLAKY)  # without the flaky one: only a permanent failure is left
    second = run(src, out)
    assert (second.ok, second.failed, second.skipped, second.skipped_input) == (0, 0, 1, 1)
    assert second.exit_code == 0, "an input failure alone must not make a scheduler rerun the job"
    strict = run(src, out, config(fail_on_input_errors=True))
    assert (strict.ok, strict.failed, strict.skipped_input, strict.exit_code) == (0, 0, 1, 3)

    save(src / "corrupt" / "2.png", 4)  # fixed: the input changed, so it is retried
    fixed = run(src, out)
    assert (fixed.ok, fixed.failed, fixed.exit_code) == (1, 0, 0)
    assert rows(out)["corrupt"]["status"] == "ok"


@pytest.mark.slow  # the fast tier reads multi-file catalogs in test_batch_nightly (an identity split over two)
def test_manifest_split_over_files_and_an_unsorted_file_reported(ray_cluster, tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "out"
    lines = {"part-0.csv": [], "part-1.csv": []}
    for i, ident in enumerate(["ann", "bob", "cat", "dan"]):
        for k in range(2):
            save(photos / ident / f"{k}.png", 10 * i + k)
            lines["part-0.csv" if i < 2 else "part-1.csv"].append(f"{ident},../photos/{ident}/{k}.png")
    exports = tmp_path / "exports"
    exports.mkdir()
    for name, body in lines.items():
        (exports / name).write_text("identity,uri\n" + "\n".join(body) + "\n")
    cfg = config(allowed_input_prefixes=[str(photos)])  # the photos live beside the exports, not under them
    summary = run(exports / "part-*.csv", out, cfg)
    assert (summary.ok, summary.failed, summary.total, summary.exit_code) == (4, 0, 4, 0)
    r = rows(out)
    assert sorted(r) == ["ann", "bob", "cat", "dan"] and all(len(v["output_uris"]) == 2 for v in r.values())

    (exports / "part-2.csv").write_text(f"identity,uri\nzed,{photos}/ann/0.png\neve,{photos}/bob/0.png\n")
    again = run(exports / "part-*.csv", out, cfg)
    assert (again.ok, again.skipped, again.exit_code) == (0, 4, 1)
    assert len(again.source_errors) == 1 and "part-2.csv is not sorted by identity" in again.source_errors[0]
    assert "zed" not in rows(out) and "eve" not in rows(out)


@pytest.mark.slow  # the fast tier compacts in test_batch_nightly (deltas, then a merge) and the fault tests below
def test_compaction_is_idempotent_and_readable(ray_cluster, tmp_path):
    from capray.batch.compact import compact

    src, out = tmp_path / "in", tmp_path / "out"
    for i in range(7):
        save(src / f"id{i}" / "1.png", i)
    run(src, out, config(compact_at_end=False))
    parts = sorted(p.name for p in (out / "manifest").glob("*.parquet"))
    assert len(parts) == 4  # 7 identities, 2 per commit
    before = rows(out)
    cfg = config(manifest_rows_per_file=3)
    first = compact(str(out), cfg)
    assert first.full and first.files_before == 4 and 1 <= first.files_after <= 3  # ~ceil(7 / 3) sorted ranges
    assert rows(out) == before
    index = manifest.read_index(str(out), {})
    ranges = [(e.first, e.last) for e in index.main]
    assert sum(e.rows for e in index.main) == 7 and all(a[1] < b[0] for a, b in zip(ranges, ranges[1:]))
    second = compact(str(out), cfg)
    assert second.files_before == second.files_after == first.files_after and rows(out) == before
    single = compact(str(out), config(), full=True)  # `capray manifest compact`: everything, re-cut
    assert single.files_after == 1 and rows(out) == before


def _fail_on_id0(real):
    """A range writer that fails for the range holding "id0" (as a store refusing that one write)."""
    def write(group, *args, **kwargs):
        if "id0" in group.column("identity").to_pylist():
            raise OSError("injected: writing this compacted file failed")
        return real(group, *args, **kwargs)
    return write


def _drop_id0(real):
    """A range writer whose result for the range holding "id0" is lost (as a block Ray Data dropped)."""
    def write(group, *args, **kwargs):
        result = real(group, *args, **kwargs)
        return result.slice(0, 0) if "id0" in group.column("identity").to_pylist() else result
    return write


@pytest.mark.parametrize("fault", [_fail_on_id0, _drop_id0])
def test_a_compaction_that_loses_a_range_keeps_every_file_and_row(ray_cluster, tmp_path, monkeypatch, fault):
    import ray

    from capray.attack.api import RunInfo
    from capray.batch import compact as compaction

    out, cfg = tmp_path / "out", config(manifest_rows_per_file=3)
    for k in range(4):  # 7 identities in 4 commit files, compacted into ~ceil(7 / 3) sorted ranges
        manifest.write_records(str(out), "run", [manifest.ManifestRow(
            **RunInfo.of(cfg).run_fields(), identity=f"id{i}", safe_name=f"id{i}", status="ok",
            finished_at=f"2024-01-01T00:00:0{i}") for i in range(2 * k, min(2 * k + 2, 7))], {})
    before = {p.name: p.read_bytes() for p in (out / "manifest").glob("*.parquet")}
    monkeypatch.setattr(compaction, "_sort_and_write", fault(compaction._sort_and_write))
    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "max_errored_blocks", -1)  # as a protect job's driver once left it
    with pytest.raises(Exception, match="injected|no file was deleted"):
        compaction.compact(str(out), cfg)
    assert {p.name: p.read_bytes() for p in (out / "manifest").glob("*.parquet")} == before
    assert sorted(rows(out)) == [f"id{i}" for i in range(7)]


def test_manifest_compact_takes_the_output_lease(ray_cluster, tmp_path, capsys):
    import argparse

    from capray.attack.api import RunInfo
    from capray.batch import manifest_command
    from capray.batch.lease import acquire

    out, cfg = tmp_path / "out", config()
    for k in range(2):
        manifest.write_records(str(out), "run", [manifest.ManifestRow(
            **RunInfo.of(cfg).run_fields(), identity=f"id{k}", safe_name=f"id{k}", status="ok")], {})
    parser = argparse.ArgumentParser()
    manifest_command.add_arguments(parser)
    args = parser.parse_args(["compact", str(out), "--preset", "smoke", "--model", "tiny"])
    holder = acquire(str(out), ttl_s=600)  # a protect job still writing there
    before = sorted(p.name for p in (out / "manifest").glob("*.parquet"))
    assert manifest_command.run(args) == 2
    assert "in use by another capray job" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "manifest").glob("*.parquet")) == before
    holder.release()
    assert manifest_command.run(args) == 0
    assert len(list((out / "manifest").glob("*.parquet"))) == 1 and sorted(rows(out)) == ["id0", "id1"]
    assert not (out / ".capray-lease.json").exists()
