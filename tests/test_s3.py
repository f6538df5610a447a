"""`capray protect` reading from and writing to S3 buckets on a local moto server (127.0.0.1)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from capray.batch.demo import SAMPLES

pytestmark = [pytest.mark.s3, pytest.mark.ray]


@pytest.fixture(scope="module")
def s3(ray_cluster, moto_s3):
    import s3fs

    moto_s3.bucket("photos")
    options = moto_s3.bucket("protected")
    return s3fs.S3FileSystem(**options), options


def cfg(options):
    from capray.config import load_config

    return load_config(preset="smoke", overrides={
        "attack": {"outer_loops": 1, "adv_steps": 2},
        "batch": {"cpus_per_actor": 0.25, "storage_options": options}})


@pytest.mark.slow
def test_s3_folder_and_manifest_inputs_to_s3_output(s3):
    from capray.batch.command import protect
    from capray.io.manifest import read_manifest

    fs, options = s3
    for ident in ("coffee", "chelsea"):
        for png in sorted((SAMPLES / ident).iterdir()):
            fs.pipe(f"photos/lib/{ident}/{png.name}", png.read_bytes())
    fs.pipe("photos/lib/junk/readme.txt", b"not an image")
    config = cfg(options)

    summary = protect("s3://photos/lib", "s3://protected/run1", config, show_progress=False)
    assert (summary.ok, summary.failed, summary.failed_input, summary.exit_code) == (2, 1, 1, 0)
    rows = {r["identity"]: r for r in read_manifest("s3://protected/run1", options).to_pylist()}
    assert sorted(rows) == ["chelsea", "coffee", "junk"] and rows["junk"]["status"] == "failed"
    assert rows["coffee"]["output_uris"] == ["s3://protected/run1/coffee/coffee_1.png",
                                             "s3://protected/run1/coffee/coffee_2.png"]
    for uri_in, uri_out in zip(rows["chelsea"]["input_uris"], rows["chelsea"]["output_uris"]):
        clean = np.array(Image.open(io.BytesIO(fs.cat(uri_in))))
        prot = np.array(Image.open(io.BytesIO(fs.cat(uri_out))))
        assert clean.shape == prot.shape and 0 < np.abs(clean.astype(int) - prot.astype(int)).max() <= 7
    run = json.loads(fs.cat("protected/run1/run.json"))
    assert run["config"]["batch"]["storage_options"]["secret"] == "***"
    assert "testing-secret" not in fs.cat("protected/run1/run.json").decode()

    assert fs.exists("protected/run1/manifest/_state/coffee.json")
    files = [f for f in fs.ls("protected/run1/manifest") if f.endswith(".parquet")]
    assert len(files) == 1 and "/main-" in files[0]  # compacted at the end of the run

    # rerun: nothing changed, so everything is skipped (the input failure too); one row per identity
    again = protect("s3://photos/lib", "s3://protected/run1", config, show_progress=False)
    assert (again.skipped, again.skipped_input, again.ok, again.failed) == (2, 1, 0, 0)
    assert read_manifest("s3://protected/run1", options).num_rows == 3


    # a CSV manifest in the bucket, with relative and absolute URIs under its own folder
    fs.pipe("photos/list.csv", b"identity,uri\ncoffee,lib/coffee/coffee_1.png\n"
                               b"coffee,s3://photos/lib/coffee/coffee_2.png\n")
    by_manifest = protect("s3://photos/list.csv", "s3://protected/run2", config, show_progress=False)
    assert (by_manifest.ok, by_manifest.failed) == (1, 0)
    row = read_manifest("s3://protected/run2", options).to_pylist()[0]
    assert row["input_fingerprint"] and row["num_photos"] == 2
    assert fs.cat("protected/run2/coffee/coffee_1.png") == fs.cat("protected/run1/coffee/coffee_1.png")

    # a photo added on S3 (new key, new ETag): only that identity is redone
    fs.pipe("photos/lib/coffee/coffee_3.png", (SAMPLES / "chelsea" / "chelsea_1.png").read_bytes())
    grown = protect("s3://photos/lib", "s3://protected/run1", config, show_progress=False)
    assert (grown.ok, grown.skipped, grown.skipped_input) == (1, 1, 1)
    assert fs.exists("protected/run1/coffee/coffee_3.png")


def test_overlapping_s3_output_is_refused(s3):
    from capray.batch.plan import UsageError, make_plan

    fs, options = s3
    fs.pipe("photos/lib2/a/1.png", (SAMPLES / "coffee" / "coffee_1.png").read_bytes())
    with pytest.raises(UsageError, match="overlaps"):
        make_plan("s3://photos/lib2", "s3://photos/lib2/out", cfg(options))
    assert not fs.exists("photos/lib2/out")


def test_the_input_root_is_probed_with_one_small_listing_and_not_cached(moto_s3, monkeypatch):
    from capray.batch.plan import _check_input
    from capray.io.storage import get_fs

    options = moto_s3.bucket("probe")
    fs, _ = get_fs("s3://probe/lib", options)  # the instance plan's get_fs returns too (fsspec's cache)
    for i in range(3):
        fs.pipe(f"probe/lib/id{i}/1.png", b"x")
    fs.pipe("probe/file.txt", b"x")
    calls, real = [], fs._call_s3

    async def spy(method, *args, **kwargs):
        calls.append((method, kwargs.get("MaxKeys")))
        return await real(method, *args, **kwargs)

    monkeypatch.setattr(fs, "_call_s3", spy)
    assert _check_input("s3://probe/lib", "s3://probe/out", options) == ("folder", [])
    assert calls == [("list_objects_v2", 1)], "ROOT must not be listed on the driver"
    assert "probe/lib" not in fs.dircache and "probe" not in fs.dircache
    for missing in ("s3://probe/nothing", "s3://probe/file.txt", "s3://no-such-bucket/lib"):
        calls.clear()
        with pytest.raises(FileNotFoundError, match="neither a folder"):
            _check_input(missing, "s3://probe/out", options)
        assert len(calls) == 1
