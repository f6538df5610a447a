"""The bulk job as a processor: a Ray Dataset a platform already has, protected through the same stages
as `capray protect` (engine stand-in: the engine is tested elsewhere)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capray.batch.stages import ProtectStage
from capray.config import load_config

pytestmark = pytest.mark.ray


class Inverting(ProtectStage):
    """No models: every photo comes back inverted, with the run's minimal record."""

    def load_protector(self):
        return None

    def run_engine(self, rgbs, identity, fixed=()):
        from capray.attack.api import ProtectionRecord

        return [255 - a for a in rgbs], ProtectionRecord.unprotected(self.cfg, identity)


@pytest.fixture(autouse=True)
def _pickle_by_value():
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _photos(folder: Path, n: int, seed: int) -> list[str]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    uris = []
    for i in range(n):
        path = folder / f"p{i}.png"
        Image.fromarray(rng.integers(0, 256, (20, 16 + i, 3), dtype=np.uint8)).save(path)
        uris.append(str(path))
    return uris


def test_processor_protects_a_dataset_built_in_memory_and_returns_records(ray_cluster, tmp_path):
    import ray

    from capray.batch import build_processor

    cfg = load_config(preset="smoke", overrides={"batch": {"cpus_per_actor": 0.25, "gpus_per_actor": 0,
                                                           "records_per_commit": 2}})
    alice, bob = _photos(tmp_path / "db" / "a", 2, 0), _photos(tmp_path / "db" / "b", 3, 1)
    rows = [{"identity": "alice", "uris": alice}, {"identity": "bob", "uris": bob},
            {"identity": "ghost", "uris": [str(tmp_path / "db" / "gone.png")]}]
    out = tmp_path / "out"
    ds = ray.data.from_items(rows)
    before = ds.context.max_errored_blocks
    with build_processor(cfg, str(out), protect_stage=Inverting) as processor:
        records = {r["identity"]: r for r in processor(ds).take_all()}
    assert ds.context.max_errored_blocks == before  # the job's settings went on a copy, not the caller's Dataset
    assert set(records) == {"alice", "bob", "ghost"}
    assert records["alice"]["status"] == records["bob"]["status"] == "ok"
    assert records["ghost"]["status"] == "failed" and records["ghost"]["failure_class"] == "input"
    assert "gone.png" in records["ghost"]["error"]
    for identity, sources in (("alice", alice), ("bob", bob)):
        outputs = records[identity]["output_uris"]
        assert [Path(u).name for u in outputs] == [Path(s).stem + ".png" for s in sources]
        for src, dst in zip(sources, outputs):
            assert Path(dst).parent.parent == out  # OUT/<identity>/<stem>.png
            original = np.array(Image.open(src).convert("RGB"))
            assert np.array_equal(np.array(Image.open(io.BytesIO(Path(dst).read_bytes()))), 255 - original)
    manifest = {r["identity"]: r for r in pq.read_table(out / "manifest").to_pylist()}
    assert set(manifest) == {"alice", "bob", "ghost"} and manifest["bob"]["num_photos"] == 3
    run = json.loads((out / "run.json").read_text())
    assert run["input"] == "ray.data.Dataset" and run["config_hash"] == cfg.config_hash()

    # the same Dataset again: everything is done with unchanged input, so nothing reaches the stages
    with build_processor(cfg, str(out), protect_stage=Inverting) as processor:
        assert processor(ray.data.from_items(rows)).take_all() == []


def test_processor_refuses_an_output_holding_another_engine_config(ray_cluster, tmp_path):
    from capray.batch import build_processor
    from capray.batch.plan import UsageError

    cfg = load_config(preset="smoke")
    out = tmp_path / "out"
    with build_processor(cfg, str(out), protect_stage=Inverting):
        pass
    other = load_config(preset="smoke", overrides={"attack": {"eps": 0.03}})
    with pytest.raises(UsageError, match="engine config"):
        build_processor(other, str(out))


def test_a_row_without_photos_fails_for_its_input(ray_cluster, tmp_path):
    import ray

    from capray.batch import build_processor

    cfg = load_config(preset="smoke", overrides={"batch": {"cpus_per_actor": 0.25, "gpus_per_actor": 0}})
    with build_processor(cfg, str(tmp_path / "out"), protect_stage=Inverting) as processor:
        [record] = processor(ray.data.from_items([{"identity": "nobody", "uris": []}])).take_all()
    assert record["status"] == "failed" and record["failure_class"] == "input"
    assert "no photos" in record["error"]
