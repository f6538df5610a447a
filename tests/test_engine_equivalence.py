"""The engine as users run it: fast == reference λ search for every method and score draw, micro-batching
changes nothing, the scoring draw is not the gradient's, and CAP really acts on real photos (fresh draw).

fp64 so that rounding cannot decide a near-tie (in exact arithmetic the compared runs are equal).
Groups mix photo sizes, as real uploads do.
"""

from __future__ import annotations

import pytest
import torch

from capray import protect_group
from capray.attack.randomness import NoiseDraw

from engine_helpers import METHOD_STEPS, RES, assert_same, load_faces, mixed_group


def run(models, smoke_config, method: str, seed: int = 0, attack: dict | None = None, **cap):
    cfg = smoke_config(seed=seed, model={"dtype": "fp64", "resolution": RES},
                       attack={**METHOD_STEPS[method], **(attack or {})},
                       cap={"ratio_max": 4, "start_fraction": 0.0, **cap})
    return protect_group(mixed_group(seed), cfg, identity=f"eq-{method}", models=models)


@pytest.mark.parametrize("method,score_draw,draws", [
    ("fsmg", "fresh", 1), ("fsmg", "gradient", 1), ("fsmg", "independent", 1), ("fsmg", "fresh", 2),
    ("aspl", "fresh", 1), ("simac", "fresh", 1), ("simac", "independent", 2),
])
def test_fast_equals_reference(fp64_models, smoke_config, method, score_draw, draws):
    fast, ref = (run(fp64_models, smoke_config, method, search=s, score_draw=score_draw, score_draws=draws)
                 for s in ("fast", "reference"))
    assert_same(fast, ref)


@pytest.mark.parametrize("method", ["aspl", "simac"])
def test_micro_batching_changes_nothing(fp64_models, smoke_config, method):
    """One photo per forward/backward and 2-image scoring chunks give the pixels of whole-group passes."""
    whole = run(fp64_models, smoke_config, method, attack={"image_batch_size": 8}, score_image_batch_size=64)
    micro = run(fp64_models, smoke_config, method, attack={"image_batch_size": 1}, score_image_batch_size=2,
                candidate_batch_size=3)
    assert_same(whole, micro)
    assert whole.consistency_after == pytest.approx(micro.consistency_after, rel=1e-9)
    assert whole.loss_trajectory == pytest.approx(micro.loss_trajectory, rel=1e-9)


def recording_factory(seen: list[NoiseDraw]):
    from capray.attack.cap import InProcessEvaluator

    def factory(*, loss_fn, n_images, batch_size, context):
        inner = InProcessEvaluator(loss_fn, context.layout, context.resolution, batch_size)

        def evaluate(candidates, draw):
            seen.append(draw)
            return inner(candidates, draw)

        return evaluate

    return factory


@pytest.mark.parametrize("score_draw", ["fresh", "gradient"])
def test_scoring_draw_is_independent_of_the_gradient_draw_by_default(fp64_models, smoke_config, score_draw):
    from capray.attack.engine import GroupAttack

    seen: list[NoiseDraw] = []
    cfg = smoke_config(model={"dtype": "fp64", "resolution": RES}, attack=METHOD_STEPS["fsmg"],
                       cap={"ratio_max": 3, "start_fraction": 0.0, "score_draw": score_draw})
    images = mixed_group(0)
    protect_group(images, cfg, identity="draws", models=fp64_models, evaluator_factory=recording_factory(seen))
    gradient_draws = [GroupAttack(fp64_models, cfg, "draws", images, None, None).draw_for_step(k) for k in range(2)]
    assert len(seen) == 2  # one scoring call per step: every distinct candidate batched together
    for k, draw in enumerate(seen):
        same = (torch.equal(draw.noise, gradient_draws[k].noise)
                and torch.equal(draw.timesteps, gradient_draws[k].timesteps))
        assert same == (score_draw == "gradient")
    if score_draw == "fresh":
        assert not torch.equal(seen[0].noise, seen[1].noise)  # a new draw every step


def test_cap_acts_on_real_photos_under_the_fresh_score_draw(tiny_models, smoke_config, faces_dir):
    """On the shared face photos: λ is not stuck at 0, and CAP lowers the consistency loss vs no CAP."""
    photos = load_faces(faces_dir, 64)
    assert len(photos) == 4
    common = {"method": "fsmg", "pgd_steps": 8, "fsmg_train_steps": 0}
    with_cap = protect_group(photos, smoke_config(attack=common, cap={"ratio_max": 50}), identity="n000050",
                             models=tiny_models)
    without = protect_group(photos, smoke_config(attack=common, cap={"enabled": False}), identity="n000050",
                            models=tiny_models)
    cap_ratios = [r for r in with_cap.lambda_schedule if r is not None]
    assert len(cap_ratios) == 4 and any(r > 0 for r in cap_ratios), cap_ratios
    assert with_cap.consistency_after < without.consistency_after
