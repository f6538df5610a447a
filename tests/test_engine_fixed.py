"""Fixed members (append mode): published photos join CAP's group without being changed.

fp64 for the exactness checks (fast == reference λ search, gradients equal to the whole-group
formula); the effect check runs on the shared face photos.
"""

from __future__ import annotations

import pytest
import torch

from capray import protect_group
from capray.attack.group import GroupLayout
from capray.attack.losses import consistency_from_stats, consistency_part, style_stats

from engine_helpers import METHOD_STEPS, RES, assert_same, load_faces, mixed_group


def published(seed: int) -> list[torch.Tensor]:
    """Two 'already protected' photos of the same person, sizes unlike the new ones."""
    gen = torch.Generator().manual_seed(1000 + seed)
    return [(torch.rand(3, *s, generator=gen, dtype=torch.float64) * 2 - 1) for s in ((36, 44), (32, 40))]


def run(models, smoke_config, method: str, fixed, **cap):
    cfg = smoke_config(model={"dtype": "fp64", "resolution": RES}, attack=METHOD_STEPS[method],
                       cap={"ratio_max": 4, "start_fraction": 0.0, **cap})
    return protect_group(mixed_group(0)[:1], cfg, identity="grows", models=models, fixed=fixed)


@pytest.mark.parametrize("method", ["fsmg", "aspl", "simac"])
def test_fast_equals_reference_with_fixed_members(fp64_models, smoke_config, method):
    fixed = published(0)
    fast, ref = (run(fp64_models, smoke_config, method, fixed, search=s) for s in ("fast", "reference"))
    assert_same(fast, ref)
    assert fast.fixed_members == 2 and fast.cap_enabled  # one new photo + two fixed: CAP has a group
    assert len(fast.images) == 1


def test_fixed_members_change_the_new_photos_and_stay_untouched(fp64_models, smoke_config):
    fixed = published(1)
    before = [f.clone() for f in fixed]
    alone = run(fp64_models, smoke_config, "fsmg", None)
    joined = run(fp64_models, smoke_config, "fsmg", fixed)
    again = run(fp64_models, smoke_config, "fsmg", fixed)
    assert all(torch.equal(a, b) for a, b in zip(fixed, before))  # never written to
    assert not alone.cap_enabled and alone.fixed_members == 0  # one photo alone: CAP has nothing to tie
    assert not torch.equal(alone.images[0], joined.images[0])
    assert torch.equal(joined.images[0], again.images[0])  # deterministic with fixed members too
    new = mixed_group(0)[0]
    assert (joined.images[0] - new.to(joined.images[0])).abs().max() <= 0.05 + 1e-9  # within ε


def test_consistency_gradient_with_fixed_members_is_the_whole_group_formula(fp64_models, smoke_config):
    """The engine's ∇L_cons (micro-batch shares, S̄ precomputed, fixed share cached) equals autograd of
    the paper's formula over new + fixed photos with S̄ inside the graph."""
    from capray.attack.engine import GroupAttack

    cfg = smoke_config(model={"dtype": "fp64", "resolution": RES}, attack={"image_batch_size": 1})
    new, fixed = mixed_group(3)[:2], published(3)
    attack = GroupAttack(fp64_models, cfg, "grad", new, None, None, fixed)
    x = attack.x.detach().clone().requires_grad_(True)
    photos = [*GroupLayout.of(new).unflatten(x), *fixed]
    stats = style_stats(fp64_models.style, torch.cat([GroupLayout.of([p]).to_model(p.reshape(-1), RES)
                                                      for p in photos]))
    whole = consistency_from_stats(stats)
    (expected,) = torch.autograd.grad(whole, x)
    cons = []
    for batch in attack.photo_batches():  # the shares the engine differentiates, one photo at a time
        xs = attack.x[batch.flat].detach().requires_grad_(True)
        part = consistency_part(attack.style_stats(batch.layout.to_model(xs, RES)), attack.mean_style(attack.x),
                                attack.group_size)
        cons.append(torch.autograd.grad(part, xs)[0])
    torch.testing.assert_close(torch.cat(cons), expected, rtol=1e-9, atol=1e-12)
    assert attack.consistency(attack.x) == pytest.approx(float(whole.detach()), rel=1e-9)


def whole_group_consistency(models, photos: list[torch.Tensor], resolution: int) -> float:
    """(1/N)·Σ‖Sᵢ − S̄‖² over every photo, by the paper's formula on the whole group at once."""
    with torch.no_grad():
        model_in = torch.cat([GroupLayout.of([p]).to_model(p.reshape(-1), resolution) for p in photos])
        return float(consistency_from_stats(style_stats(models.style, model_in)))


def test_append_keeps_the_group_consistent_on_real_photos(tiny_models, smoke_config, faces_dir):
    """A person's three published photos and one new one (shared faces): protecting the new photo
    against the published ones leaves the whole group more consistent in style than protecting it
    alone, as a one-photo group (what an append without fixed members would do)."""
    faces = load_faces(faces_dir, 64)
    common = smoke_config(attack={"method": "fsmg", "pgd_steps": 8, "fsmg_train_steps": 0}, cap={"ratio_max": 50})
    first = protect_group(faces[:3], common, identity="n000050", models=tiny_models)
    appended = protect_group(faces[3:], common, identity="n000050", models=tiny_models, fixed=first.images)
    alone = protect_group(faces[3:], common, identity="n000050", models=tiny_models)
    assert appended.cap_enabled and any(r for r in appended.lambda_schedule if r is not None)
    res = common.model.resolution
    with_fixed = whole_group_consistency(tiny_models, [*first.images, *appended.images], res)
    without = whole_group_consistency(tiny_models, [*first.images, *alone.images], res)
    print(f"whole-group L_cons: append {with_fixed:.4g}, new photo alone {without:.4g}")
    assert with_fixed < without, (with_fixed, without)
    assert appended.consistency_after == pytest.approx(with_fixed, rel=1e-4)  # the record says the same
