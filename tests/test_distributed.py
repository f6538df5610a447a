"""Sharding λ-candidate scoring over actors changes nothing: same λ, same pixels as local scoring."""

from __future__ import annotations

import pytest
import torch

from capray import protect_group

pytestmark = pytest.mark.ray


def test_sharded_candidates_equal_local(ray_cluster, tiny_model_dir, smoke_config):
    from capray.attack.engine import load_models
    from capray.distributed.candidates import CandidateWorker, sharded_evaluator_factory

    cfg = smoke_config(model={"dtype": "fp64"}, attack={"method": "aspl"},
                       cap={"ratio_max": 12, "start_fraction": 0.0})
    models = load_models(cfg.model)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    workers = [CandidateWorker.options(num_cpus=0.25).remote(cfg.model.model_dump_json()) for _ in range(2)]
    try:
        sharded = protect_group(images, cfg, identity="shard", models=models,
                                evaluator_factory=sharded_evaluator_factory(workers))
    finally:
        for w in workers:
            ray_cluster.kill(w)
    local = protect_group(images, cfg, identity="shard", models=models)
    assert sharded.lambda_schedule == local.lambda_schedule
    assert all(r is not None for r in local.lambda_schedule)
    assert all(torch.equal(a, b) for a, b in zip(sharded.images, local.images))
