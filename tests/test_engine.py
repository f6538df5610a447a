"""protect_group end to end on the tiny model: invariants, determinism, every method ± CAP."""

from __future__ import annotations

import pytest
import torch

from capray import protect_group


def group(seed: int = 0, n: int = 4, size: int = 64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, size, size, generator=gen)
    return ((base + 0.3 * torch.rand(n, 3, size, size, generator=gen)).clamp(0, 1) * 2 - 1)


def assert_within_budget(clean, protected, eps):
    for c, p in zip(clean, protected):
        assert p.shape == c.shape
        assert (p - c).abs().max() <= eps + 1e-6
        assert p.min() >= -1 and p.max() <= 1


@pytest.mark.parametrize("method", ["fsmg", "aspl", "simac"])
@pytest.mark.parametrize("cap", [True, False])
def test_every_method_runs_end_to_end(tiny_models, smoke_config, method, cap):
    images = group()
    cfg = smoke_config(attack={"method": method}, cap={"enabled": cap})
    result = protect_group(images, cfg, identity="alice", models=tiny_models)
    assert_within_budget(images, result.images, cfg.attack.eps)
    assert len(result.steps) == cfg.attack.total_pgd_steps
    assert all(torch.isfinite(torch.tensor(result.loss_trajectory)))
    assert any(not torch.equal(a, b) for a, b in zip(images, result.images))  # it did perturb
    k_hat = round(cfg.cap.start_fraction * cfg.attack.total_pgd_steps)
    if cap:
        assert all(r is None for r in result.lambda_schedule[:k_hat])
        assert all(0 <= r <= cfg.cap.ratio_max for r in result.lambda_schedule[k_hat:])
        assert len(result.distinct_counts) == cfg.attack.total_pgd_steps - k_hat
    else:
        assert all(r is None for r in result.lambda_schedule)
    for m in result.metrics:
        assert 0 < m["linf_255"] <= round(cfg.attack.eps * 127.5)
        assert m["psnr"] > 30 and 0.5 < m["ssim"] <= 1


def test_same_seed_same_pixels_different_seed_different(tiny_models, smoke_config):
    images = group(1)
    cfg = smoke_config(attack={"method": "aspl"})
    a = protect_group(images, cfg, identity="bob", models=tiny_models)
    b = protect_group(images, cfg, identity="bob", models=tiny_models)
    assert all(torch.equal(x, y) for x, y in zip(a.images, b.images))
    assert a.lambda_schedule == b.lambda_schedule
    c = protect_group(images, smoke_config(seed=99, attack={"method": "aspl"}), identity="bob", models=tiny_models)
    assert any(not torch.equal(x, y) for x, y in zip(a.images, c.images))


def test_originals_are_not_modified(tiny_models, smoke_config):
    images = group(2)
    before = images.clone()
    protect_group(images, smoke_config(), identity="carol", models=tiny_models)
    assert torch.equal(images, before)


def test_cap_lowers_the_consistency_loss(tiny_models, smoke_config):
    images = group(3)
    common = {"attack": {"method": "fsmg", "pgd_steps": 12, "fsmg_train_steps": 0}}
    with_cap = protect_group(images, smoke_config(**common, cap={"ratio_max": 20}), identity="d", models=tiny_models)
    without = protect_group(images, smoke_config(**common, cap={"enabled": False}), identity="d", models=tiny_models)
    assert with_cap.consistency_after < without.consistency_after
    assert with_cap.consistency_after < with_cap.consistency_before


def test_one_photo_group_runs_baseline_and_says_cap_was_skipped(tiny_models, smoke_config):
    images = group(4, n=1)
    cfg = smoke_config(attack={"method": "aspl"})
    result = protect_group(images, cfg, identity="solo", models=tiny_models)
    assert_within_budget(images, result.images, cfg.attack.eps)
    assert result.cap_enabled is False
    assert all(r is None for r in result.lambda_schedule)
    assert any("CAP skipped" in note for note in result.notes)


def test_original_resolution_and_mixed_sizes(tiny_models, smoke_config):
    gen = torch.Generator().manual_seed(5)
    images = [torch.rand(3, 80, 120, generator=gen) * 2 - 1, torch.rand(3, 100, 70, generator=gen) * 2 - 1,
              torch.rand(3, 64, 64, generator=gen) * 2 - 1]
    cfg = smoke_config(attack={"method": "fsmg"})
    result = protect_group(images, cfg, identity="sizes", models=tiny_models)
    assert [tuple(i.shape) for i in result.images] == [tuple(i.shape) for i in images]
    assert_within_budget(images, result.images, cfg.attack.eps)


def test_static_ratio_content_loss_and_separate_references(tiny_models, smoke_config):
    images, refs = group(6), group(7, n=2)
    cfg = smoke_config(attack={"method": "aspl"}, cap={"ratio_mode": "static", "static_ratio": 20, "loss": "content"})
    result = protect_group(images, cfg, identity="e", models=tiny_models, references=refs)
    k_hat = round(cfg.cap.start_fraction * cfg.attack.total_pgd_steps)
    assert result.lambda_schedule[k_hat:] == [20] * (cfg.attack.total_pgd_steps - k_hat)
    assert_within_budget(images, result.images, cfg.attack.eps)


def test_simac_feature_loss_options_change_the_gradient(tiny_models, smoke_config):
    """Detached (the default, as SimAC's public code): no feature gradient; flowing, its reduction matters."""
    images = group(8)
    off = {"enabled": False}

    def run(**simac):
        cfg = smoke_config(attack={"method": "simac", "simac": {"feature_weight": 1000.0, **simac}}, cap=off)
        return protect_group(images, cfg, identity="f", models=tiny_models).images

    detached, flowing_mean, flowing_sum = run(), run(feature_detach=False), run(feature_detach=False,
                                                                                  feature_reduction="sum")
    weightless = run(feature_weight=0.0)  # detached: the weight cannot matter, the loss is not even computed
    assert all(torch.equal(x, y) for x, y in zip(detached, weightless))
    assert any(not torch.equal(x, y) for x, y in zip(detached, flowing_mean))
    assert any(not torch.equal(x, y) for x, y in zip(flowing_mean, flowing_sum))


def test_bad_groups_raise_clear_errors(tiny_models, smoke_config):
    with pytest.raises(ValueError, match="at least one photo"):
        protect_group([], smoke_config(), models=tiny_models)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        protect_group([torch.full((3, 8, 8), 2.0)], smoke_config(), models=tiny_models)
    with pytest.raises(ValueError, match="shape"):
        protect_group([torch.zeros(8, 8)], smoke_config(), models=tiny_models)


def test_offloading_the_main_surrogate_changes_nothing(tiny_models, smoke_config):
    images = group(9)
    plain = protect_group(images, smoke_config(attack={"method": "aspl", "outer_loops": 3}), identity="o",
                          models=tiny_models)
    offloaded = protect_group(images, smoke_config(attack={"method": "aspl", "outer_loops": 3,
                                                           "surrogate": {"offload_main": True}}),
                              identity="o", models=tiny_models)
    assert all(torch.equal(a, b) for a, b in zip(plain.images, offloaded.images))
    assert plain.lambda_schedule == offloaded.lambda_schedule


def test_memory_profile_gives_the_same_pixels(smoke_config, tiny_model_dir):
    """Gradient checkpointing + offloaded main surrogate (the 24 GB profile) only trade time for memory."""
    from capray.attack.engine import load_models

    images = group(10)
    plain_cfg = smoke_config(attack={"method": "aspl"})
    lean_cfg = smoke_config(model={"gradient_checkpointing": True},
                            attack={"method": "aspl", "surrogate": {"offload_main": True}})
    lean_models = load_models(lean_cfg.model)
    assert lean_models.parts.unet.is_gradient_checkpointing
    plain = protect_group(images, plain_cfg, identity="m", models=load_models(plain_cfg.model))
    lean = protect_group(images, lean_cfg, identity="m", models=lean_models)
    assert all(torch.equal(a, b) for a, b in zip(plain.images, lean.images))
