"""Shared fixtures: a tiny model built once, smoke configs, one local Ray cluster per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FACES = SHARED / "data" / "faces" / "n000050"
# The session's Ray starts its HTTP proxies with this body limit (Serve reads it when a proxy starts, so it
# is a cluster setting); test_serve_http's app uses the same value as its serve.max_request_bytes.
PROXY_MAX_REQUEST_BYTES = 4_000_000


@pytest.fixture(scope="session")
def capray_cache(tmp_path_factory) -> Path:
    """One cache (tiny model, class images) for the whole session, also seen by Ray workers."""
    path = tmp_path_factory.mktemp("capray-cache")
    os.environ["CAPRAY_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(capray_cache) -> Path:
    from capray.models.tiny import ensure_tiny_model

    return ensure_tiny_model(str(capray_cache))


@pytest.fixture(scope="session")
def tiny_models(tiny_model_dir):
    """Loaded once: tiny SD parts + random VGG-19, on CPU in fp32."""
    from capray.attack.engine import load_models
    from capray.config import load_config

    return load_models(load_config(preset="smoke").model)


@pytest.fixture(scope="session")
def fp64_models(tiny_model_dir):
    """The tiny model in fp64 at 32 px (engine_helpers.RES): exactness tests, where rounding must not
    decide a near-tie."""
    from capray.attack.engine import load_models
    from capray.config import load_config

    return load_models(load_config(preset="smoke", overrides={"model": {"dtype": "fp64", "resolution": 32}}).model)


@pytest.fixture
def smoke_config():
    from capray.config import load_config

    def make(**overrides):
        return load_config(preset="smoke", overrides=overrides)

    return make


@pytest.fixture(scope="session")
def ray_cluster(capray_cache):
    """One local Ray for the whole session: more logical CPUs than cores so actors never starve readers."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        from capray.serve.body_limit import proxy_env

        os.environ.update(proxy_env(PROXY_MAX_REQUEST_BYTES))
        ray.init(address="local", num_cpus=8, object_store_memory=256 * 1024**2, include_dashboard=False,
                 runtime_env={"env_vars": {"CAPRAY_CACHE": str(capray_cache)}}, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    if not FACES.exists():
        pytest.skip("shared sample faces not present")
    return FACES


class MotoS3:
    """A moto S3 server on 127.0.0.1 (as s3fs's own tests run one): fsspec options and buckets on demand."""

    def __init__(self, endpoint: str):
        self.options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing-secret",
                        "client_kwargs": {"region_name": "us-east-1"}}

    def bucket(self, name: str) -> dict:
        """Create bucket `name` (once) and return the fsspec options that reach it."""
        import botocore.session

        client = botocore.session.get_session().create_client(
            "s3", endpoint_url=self.options["endpoint_url"], region_name="us-east-1",
            aws_access_key_id=self.options["key"], aws_secret_access_key=self.options["secret"])
        if name not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
            client.create_bucket(Bucket=name)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # a fresh client per test module sees the new bucket
        return dict(self.options)


@pytest.fixture(scope="session")
def moto_s3():
    import logging

    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield MotoS3(f"http://{host}:{port}")
    server.stop()
