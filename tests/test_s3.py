"""`capray protect` reading from and writing to S3 buckets on a local moto server (127.0.0.1)."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from capray.batch.demo import SAMPLES

pytestmark = [pytest.mark.s3, pytest.mark.ray]


@pytest.fixture(scope="module")
def s3(ray_cluster):
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing-secret",
               "client_kwargs": {"region_name": "us-east-1"}}
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(**options)
    import botocore.session

    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=options["endpoint_url"], region_name="us-east-1",
        aws_access_key_id=options["key"], aws_secret_access_key=options["secret"])
    for bucket in ("photos", "protected"):
        client.create_bucket(Bucket=bucket)
    yield fs, options
    server.stop()


def cfg(options):
    from capray.config import load_config

    return load_config(preset="smoke", overrides={
        "attack": {"outer_loops": 1, "adv_steps": 2},
        "batch": {"cpus_per_actor": 0.25, "storage_options": options}})


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
    assert len(files) == 1 and "/compact-" in files[0]  # compacted at the end of the run

    # rerun: nothing changed, so everything is skipped (the input failure too); one row per identity
    again = protect("s3://photos/lib", "s3://protected/run1", config, show_progress=False)
    assert (again.skipped, again.skipped_input, again.ok, again.failed) == (2, 1, 0, 0)
    assert read_manifest("s3://protected/run1", options).num_rows == 3


    # a CSV manifest in the bucket, with relative and absolute URIs
    fs.pipe("photos/m/list.csv", b"identity,uri\ncoffee,../lib/coffee/coffee_1.png\n"
                                 b"coffee,s3://photos/lib/coffee/coffee_2.png\n")
    by_manifest = protect("s3://photos/m/list.csv", "s3://protected/run2", config, show_progress=False)
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
