"""Sharding through the front doors: Serve's Protector and `capray protect` borrow the scoring pool, same pixels."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.ray

SHARDING = {"mode": "always", "actors": 1, "gpus_per_actor": 0, "cpus_per_actor": 0.25}


def _config(**sharding):
    from capray.config import load_config

    # N = 3 photos, chunks of 6 images: 2 candidates per chunk, 6 per scoring call → 3 shard units
    return load_config(preset="smoke", overrides={
        "cap": {"start_fraction": 0.0, "candidate_batch_size": 6, "score_image_batch_size": 6},
        "batch": {"gpus_per_actor": 0, "cpus_per_actor": 0.5},
        "serve": {"min_replicas": 1, "max_replicas": 1, "gpus_per_replica": 0, "cpus_per_replica": 0.5},
        "sharding": {**SHARDING, **sharding}})


def _photos() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8) for i in range(3)]


def test_sharding_is_server_owned_not_per_request():
    from capray.serve.limits import RequestError, effective_config

    with pytest.raises(RequestError) as refused:
        effective_config(_config(mode="off"), {"sharding": {"mode": "always"}})
    assert refused.value.status == 422 and "config.sharding.mode" in refused.value.detail


def test_deploy_config_lists_the_scoring_pool_only_when_sharding_is_on():
    from capray.serve.app import ServeArgs, deploy_config

    names = [[d["name"] for d in deploy_config(ServeArgs(preset="smoke", overrides={"sharding": {"mode": m}}))
              ["applications"][0]["deployments"]] for m in ("off", "auto")]
    assert names == [["Protector", "Ingress"], ["Protector", "Ingress", "ScoringPool"]]


@pytest.mark.slow
def test_serve_protector_shards_over_the_pool_with_the_pixels_of_local_scoring(ray_cluster, tiny_model_dir):
    from ray import serve
    from ray.serve.context import _get_global_client

    from capray.attack.api import protect_arrays
    from capray.attack.engine import load_models
    from capray.serve.app import ProtectorDeployment, ScoringPoolDeployment, scoring_pool_options

    cfg = _config()
    started_here = _get_global_client(raise_if_no_controller_running=False) is None
    if started_here:  # no Serve yet: start one on a free loopback port, never the shared default 8000
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    pool = ScoringPoolDeployment.options(**scoring_pool_options(cfg.sharding)).bind(
        cfg.model.model_dump_json(), cfg.sharding.model_dump_json())
    app = ProtectorDeployment.options(ray_actor_options={"num_cpus": 0.5}).bind(cfg.model_dump(mode="json"), pool)
    try:
        handle = serve.run(app, name="capray-sharding", route_prefix=None)
        pool_handle = serve.get_deployment_handle("ScoringPool", app_name="capray-sharding")
        for _ in range(600):  # the scoring actor has loaded its models
            if pool_handle.stats.remote().result()["ready"] == 1:
                break
            time.sleep(0.2)
        events = list(handle.options(stream=True).protect.remote(_photos(), cfg.model_dump(mode="json"), "alice"))
        protected, record = events[-1][1]
        lent = pool_handle.stats.remote().result()["lent"]
    finally:
        serve.delete("capray-sharding")
        if started_here:
            serve.shutdown()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Protector replica runs (Ray: one thread below one CPU)
    try:
        local, local_record = protect_arrays(_photos(), cfg, "alice", load_models(cfg.model))
    finally:
        torch.set_num_threads(threads)
    assert lent > 0  # the Protector borrowed the scoring actor
    assert record.lambda_schedule == local_record.lambda_schedule
    assert all(np.array_equal(a, b) for a, b in zip(protected, local))
    assert record.config_hash == _config(mode="off").config_hash()


class CountsLoans:
    """Mixin for the protect actor: after each group, writes how many actor-loans the job's pool has made."""

    PATH = ""

    def run_engine(self, rgbs, identity, fixed=()):
        out = super().run_engine(rgbs, identity, fixed)
        import ray

        with open(self.PATH, "w") as fh:
            fh.write(str(ray.get(self.scoring_pool.handle.stats.remote())["lent"]))
        return out


@pytest.mark.slow
def test_capray_protect_shards_over_the_pool_with_the_pixels_of_local_scoring(ray_cluster, tiny_model_dir,
                                                                             tmp_path):
    import sys

    from PIL import Image
    from ray import cloudpickle

    from capray.batch.command import protect
    from capray.batch.stages import ProtectStage

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    src = tmp_path / "in" / "alice"
    src.mkdir(parents=True)
    for i, rgb in enumerate(_photos()):
        Image.fromarray(rgb).save(src / f"p{i}.png")
    loans = tmp_path / "loans"
    counting = type("CountingActor", (CountsLoans, ProtectStage), {"PATH": str(loans)})
    on, off = _config(), _config(mode="off")
    assert protect(str(tmp_path / "in"), str(tmp_path / "on"), on, show_progress=False,
                   protect_stage=counting).ok == 1
    assert int(loans.read_text()) > 0  # the protect actor borrowed the scoring actor
    assert protect(str(tmp_path / "in"), str(tmp_path / "off"), off, show_progress=False).ok == 1
    for i in range(3):
        assert (tmp_path / "on" / "alice" / f"p{i}.png").read_bytes() == \
            (tmp_path / "off" / "alice" / f"p{i}.png").read_bytes()
