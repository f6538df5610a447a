"""The fast exact λ search chooses exactly what Algorithm 1 chooses."""

from __future__ import annotations

import pytest
import torch

from capray.attack.cap import InProcessEvaluator, fast_search, reference_search
from capray.attack.pgd import sign_step
from capray.attack.randomness import NoiseDraw


def synthetic(seed: int, p: int = 600):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(p, generator=gen) * 2 - 1
    x = (x0 + 0.02 * torch.randn(p, generator=gen)).clamp(-1, 1)
    g_re = torch.randn(p, generator=gen, dtype=torch.float64).float()
    g_c = (torch.randn(p, generator=gen) * 0.05)
    weights = torch.randn(p, generator=gen)
    draw = NoiseDraw(torch.zeros(2, dtype=torch.long), torch.zeros(2, 1, 1, 1), torch.zeros(2, 1, 1, 1))

    def loss_fn(cands: torch.Tensor, _draw) -> torch.Tensor:  # 2 "photos" of p/2 values each
        per = torch.sin(3 * cands) * weights + cands.pow(2)
        return per.view(-1, 2, p // 2).sum(-1).view(-1)

    return x0, x, g_re, g_c, loss_fn, draw


def test_fast_equals_reference_on_synthetic_losses():
    for seed in range(5):
        x0, x, g_re, g_c, loss_fn, draw = synthetic(seed)
        ev = InProcessEvaluator(loss_fn, n_images=2, batch_size=7)
        ref = reference_search(x, x0, lambda xx, r: g_re - r * g_c, range(0, 101), 0.005, 0.05, ev, draw)
        fast = fast_search(x, x0, g_re, g_c, range(0, 101), 0.005, 0.05, ev, draw, batch_size=7)
        assert fast.ratio == ref.ratio
        assert torch.equal(fast.next_x, ref.next_x)
        assert fast.best_loss == ref.best_loss
        # distinct candidates = distinct projected images, counted by brute force
        brute = {sign_step(x, x0, g_re - r * g_c, 0.005, 0.05).numpy().tobytes() for r in range(101)}
        assert fast.distinct == len(brute) == ref.distinct
        # every run of identical candidates is scored once, with the loss the reference saw
        for r, loss in fast.losses.items():
            assert loss == ref.losses[r]


def test_fast_search_scores_each_distinct_candidate_once():
    x0, x, g_re, g_c, loss_fn, draw = synthetic(11)
    ev = InProcessEvaluator(loss_fn, n_images=2, batch_size=4)
    fast = fast_search(x, x0, g_re, g_c, range(0, 51), 0.005, 0.05, ev, draw, batch_size=4)
    assert ev.forward_passes == -(-fast.distinct // 4)


def test_all_candidates_identical_gives_lambda_zero():
    x0, x, g_re, _, loss_fn, draw = synthetic(3)
    ev = InProcessEvaluator(loss_fn, n_images=2, batch_size=8)
    fast = fast_search(x, x0, g_re, torch.zeros_like(g_re), range(0, 101), 0.005, 0.05, ev, draw, batch_size=8)
    assert fast.ratio == 0 and fast.distinct == 1


@pytest.fixture(scope="module")
def fp64_models(tiny_model_dir):
    """fp64 so that rounding cannot decide a near-tie (in exact arithmetic both searches are equal)."""
    from capray.attack.engine import load_models
    from capray.config import load_config

    return load_models(load_config(preset="smoke", overrides={"model": {"dtype": "fp64"}}).model)


def test_engine_fast_equals_reference_over_steps_and_groups(fp64_models, smoke_config):
    for seed, n in [(0, 4), (5, 3)]:
        gen = torch.Generator().manual_seed(seed)
        images = torch.rand(n, 3, 64, 64, generator=gen) * 2 - 1
        runs = {}
        for search in ("fast", "reference"):
            cfg = smoke_config(seed=seed, model={"dtype": "fp64"}, attack={"method": "fsmg", "pgd_steps": 4, "fsmg_train_steps": 0},
                               cap={"ratio_max": 12, "start_fraction": 0.0, "search": search})
            from capray import protect_group

            runs[search] = protect_group(images, cfg, identity=f"g{seed}", models=fp64_models)
        assert runs["fast"].lambda_schedule == runs["reference"].lambda_schedule
        assert all(r is not None for r in runs["fast"].lambda_schedule)
        for a, b in zip(runs["fast"].images, runs["reference"].images):
            assert torch.equal(a, b)
