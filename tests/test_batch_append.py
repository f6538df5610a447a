"""Growing identities (`batch.on_added_photos`): a rerun protects only new or replaced photos, holding the
published ones fixed in CAP's group, and never rewrites a published photo; `reprotect` redoes the group."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capray.batch.stages.protect import ProtectStage

from batch_helpers import config, save

pytestmark = pytest.mark.ray


class CountingStandIn(ProtectStage):
    """No models: each photo to protect comes back +1 (mod 256); the record counts the fixed photos."""

    def load_protector(self):
        return None

    def run_engine(self, rgbs, identity, fixed=()):
        from capray.attack.api import ProtectionRecord

        record = ProtectionRecord.unprotected(self.cfg, identity)
        record.fixed_members = len(fixed)
        return [(a + 1).astype(np.uint8) for a in rgbs], record


@pytest.fixture(autouse=True)
def _pickle_by_value():
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def run(src: Path, out: Path, cfg=None, **kw):
    from capray.batch.command import protect

    return protect(str(src), str(out), cfg or config(), show_progress=False, **kw)


def row(out: Path, identity: str) -> dict:
    table = pq.read_table(out / "manifest")
    latest = max((r for r in table.to_pylist() if r["identity"] == identity), key=lambda r: r["finished_at"])
    return latest


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.png"))}


def linf(a: Path, b: Path) -> int:
    x, y = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in (a, b))
    return int(np.abs(x - y).max())


def run_id(out: Path) -> str:
    return json.loads((out / "run.json").read_text())["run_id"]


@pytest.mark.slow
def test_append_protects_only_new_photos_and_never_rewrites_published_ones(ray_cluster, tmp_path):
    """The tiny model end to end: add, replace and delete photos of a protected identity."""
    src, out = tmp_path / "in", tmp_path / "out"
    cfg = config()
    eps_255 = round(cfg.attack.eps * 127.5)
    for k in range(2):
        save(src / "p" / f"{k}.png", k)
    save(src / "q" / "0.png", 10)
    assert run(src, out, cfg).ok == 2
    first_run, before = run_id(out), snapshot(out / "p")
    assert row(out, "p")["protection_mode"] == "group"

    save(src / "p" / "2.png", 2)  # a new photo
    added = run(src, out, cfg)
    assert (added.ok, added.skipped) == (1, 1)
    after = snapshot(out / "p")
    assert {k: after[k] for k in before} == before, "a published photo was rewritten"
    assert linf(out / "p" / "2.png", src / "p" / "2.png") <= eps_255
    assert linf(out / "p" / "2.png", src / "p" / "2.png") > 0
    r, second_run = row(out, "p"), run_id(out)
    assert r["protection_mode"] == "append" and r["fixed_members"] == 2 and r["cap_enabled"]
    assert r["fixed_uris"] == [str(out / "p" / f"{k}.png") for k in range(2)]
    assert r["protected_uris"] == [str(out / "p" / "2.png")]
    assert r["output_uris"] == [str(out / "p" / f"{k}.png") for k in range(3)]  # aligned with input_uris
    assert r["published_runs"] == [first_run, first_run, second_run] and r["run_id"] == second_run
    assert len(r["linf_255"]) == 1  # the per-photo figures are the newly protected photo's

    save(src / "p" / "1.png", 11)  # replaced in place: protected again, alone, against the others
    replaced = run(src, out, cfg)
    assert replaced.ok == 1
    now = snapshot(out / "p")
    assert now["0.png"] == after["0.png"] and now["2.png"] == after["2.png"] and now["1.png"] != after["1.png"]
    assert linf(out / "p" / "1.png", src / "p" / "1.png") <= eps_255
    r = row(out, "p")
    assert r["protection_mode"] == "append" and r["protected_uris"] == [str(out / "p" / "1.png")]
    assert r["published_runs"] == [first_run, run_id(out), second_run]

    (src / "p" / "0.png").unlink()  # deleted: its output goes, nothing is protected
    deleted = run(src, out, cfg)
    assert deleted.ok == 1
    assert snapshot(out / "p") == {k: v for k, v in now.items() if k != "0.png"}
    r = row(out, "p")
    assert r["protection_mode"] == "kept" and r["protected_uris"] == [] and r["pgd_steps"] is None
    assert r["removed_output_uris"] == [str(out / "p" / "0.png")]


@pytest.mark.slow
def test_reprotect_changes_every_photo_and_is_its_own_config(ray_cluster, tmp_path):
    from capray.batch.plan import UsageError

    src, out = tmp_path / "in", tmp_path / "out"
    cfg = config(on_added_photos="reprotect")
    assert cfg.config_hash() != config().config_hash()
    for k in range(2):
        save(src / "p" / f"{k}.png", k)
    assert run(src, out, cfg).ok == 1
    before = snapshot(out / "p")
    save(src / "p" / "2.png", 2)
    assert run(src, out, cfg).ok == 1
    after = snapshot(out / "p")
    assert all(after[k] != before[k] for k in before), "reprotect must protect the whole group again"
    assert row(out, "p")["protection_mode"] == "group" and row(out, "p")["fixed_uris"] == []
    with pytest.raises(UsageError, match="resume needs the same config"):
        run(src, out, config())  # the policy decides pixels: an OUTPUT keeps the one it started with


def test_a_missing_published_output_is_protected_again_and_said_so(ray_cluster, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    for k in range(3):
        save(src / "p" / f"{k}.png", k)
    assert run(src, out, protect_stage=CountingStandIn).ok == 1
    kept = snapshot(out / "p")
    (out / "p" / "1.png").unlink()  # someone removed a published output
    save(src / "p" / "3.png", 3)
    assert run(src, out, protect_stage=CountingStandIn).ok == 1
    r = row(out, "p")
    assert r["fixed_uris"] == [str(out / "p" / "0.png"), str(out / "p" / "2.png")] and r["fixed_members"] == 2
    assert r["protected_uris"] == [str(out / "p" / "1.png"), str(out / "p" / "3.png")]
    assert any("1.png: its published output could not be held fixed" in n for n in r["notes"])
    now = snapshot(out / "p")
    assert now["0.png"] == kept["0.png"] and now["2.png"] == kept["2.png"] and "1.png" in now
