"""The fast exact λ search chooses exactly what Algorithm 1 chooses."""

from __future__ import annotations

import pytest
import torch

from capray.attack import cap
from capray.attack.cap import CandidateScorer, CandidateSet, InProcessEvaluator, fast_search, reference_search, repeats
from capray.attack.group import GroupLayout
from capray.attack.pgd import sign_step
from capray.attack.randomness import NoiseDraw

SIDE = 10  # two synthetic 3×10×10 "photos" already at model resolution (the resize is the identity)
LAYOUT = GroupLayout(((3, SIDE, SIDE), (3, SIDE, SIDE)))


def synthetic(seed: int, p: int = 600):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(p, generator=gen) * 2 - 1
    x = (x0 + 0.02 * torch.randn(p, generator=gen)).clamp(-1, 1)
    g_re = torch.randn(p, generator=gen, dtype=torch.float64).float()
    g_c = (torch.randn(p, generator=gen) * 0.05)
    weights = torch.randn(p // 2, generator=gen)
    draw = NoiseDraw(torch.zeros(2, dtype=torch.long), torch.zeros(2, 1, 1, 1), torch.zeros(2, 1, 1, 1))

    def loss_fn(images: torch.Tensor, rows: NoiseDraw) -> torch.Tensor:  # per image; the draw shifts it
        flat = images.reshape(images.shape[0], -1)
        return (torch.sin(3 * flat) * weights + flat.pow(2)).sum(-1) + rows.noise.reshape(len(flat), -1).sum(-1)

    return x0, x, g_re, g_c, loss_fn, draw


def direction(g_re, g_c):
    """The reference search's step direction for ratio r (bound to this iteration's gradients)."""
    return lambda xx, r: g_re - r * g_c


def shared_scorer(loss_fn, draw, image_batch_size: int) -> CandidateScorer:
    return CandidateScorer(InProcessEvaluator(loss_fn, LAYOUT, SIDE, image_batch_size), lambda r: [draw], shared=True)


def test_fast_equals_reference_on_synthetic_losses():
    for seed in range(5):
        x0, x, g_re, g_c, loss_fn, draw = synthetic(seed)
        ev = shared_scorer(loss_fn, draw, 7)
        ref = reference_search(x, x0, direction(g_re, g_c), range(0, 101), 0.005, 0.05, ev)
        fast = fast_search(x, x0, g_re, g_c, range(0, 101), 0.005, 0.05, ev, batch_size=7)
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
    ev = shared_scorer(loss_fn, draw, 8)  # 8 images = 4 candidates of 2 photos per forward
    fast = fast_search(x, x0, g_re, g_c, range(0, 51), 0.005, 0.05, ev, batch_size=4)
    assert ev.evaluator.forward_passes == -(-fast.distinct // 4)


def test_scoring_batches_by_images_and_results_do_not_depend_on_the_chunk():
    """Chunks of 3 images cut candidates in half; the scores are those of whole-candidate scoring."""
    x0, x, g_re, g_c, loss_fn, draw = synthetic(12)
    cands = torch.stack([sign_step(x, x0, g_re - r * g_c, 0.005, 0.05) for r in range(7)])
    whole = InProcessEvaluator(loss_fn, LAYOUT, SIDE, 14)(cands, draw)
    chunked = InProcessEvaluator(loss_fn, LAYOUT, SIDE, 3)
    torch.testing.assert_close(chunked(cands, draw), whole, rtol=0, atol=1e-4)
    assert chunked.forward_passes == -(-14 // 3)
    by_hand = torch.stack([loss_fn(c.view(2, 3, SIDE, SIDE), draw).sum() for c in cands])
    torch.testing.assert_close(whole, by_hand, rtol=0, atol=1e-4)


def test_all_candidates_identical_gives_lambda_zero():
    x0, x, g_re, _, loss_fn, draw = synthetic(3)
    ev = shared_scorer(loss_fn, draw, 16)
    fast = fast_search(x, x0, g_re, torch.zeros_like(g_re), range(0, 101), 0.005, 0.05, ev, batch_size=8)
    assert fast.ratio == 0 and fast.distinct == 1


def per_ratio_scorer(loss_fn, k: int) -> CandidateScorer:
    """`independent`-style: every candidate scored on its own draws (K of them, averaged)."""
    def draws(r: int) -> list[NoiseDraw]:
        gens = [torch.Generator().manual_seed(1000 * r + j) for j in range(k)]
        return [NoiseDraw(torch.zeros(2, dtype=torch.long), torch.randn(2, 1, 1, 1, generator=g),
                          torch.zeros(2, 1, 1, 1)) for g in gens]

    return CandidateScorer(InProcessEvaluator(loss_fn, LAYOUT, SIDE, 6), draws, shared=False)


@pytest.mark.parametrize("k", [1, 3])
def test_fast_equals_reference_with_per_candidate_draws(k):
    """Identical candidates score differently on their own draws: the fast search scores every r."""
    for seed in range(3):
        x0, x, g_re, g_c, loss_fn, _ = synthetic(seed)
        scorer = per_ratio_scorer(loss_fn, k)
        ref = reference_search(x, x0, direction(g_re, g_c), range(0, 41), 0.005, 0.05, scorer)
        fast = fast_search(x, x0, g_re, g_c, range(0, 41), 0.005, 0.05, scorer, batch_size=8)
        assert fast.ratio == ref.ratio and torch.equal(fast.next_x, ref.next_x)
        assert fast.distinct == ref.distinct
        assert sorted(fast.losses) == list(range(41)) and fast.losses == ref.losses


def test_lazy_candidates_build_the_pixels_of_whole_candidates():
    """A CandidateSet's spans and scoring rows are the whole candidates' values bit for bit, mixed sizes too."""
    layout = GroupLayout(((3, 6, 8), (3, 10, 10), (3, 7, 5)))
    p = sum(layout.sizes())
    gen = torch.Generator().manual_seed(21)
    x0 = torch.rand(p, generator=gen) * 2 - 1
    x = (x0 + 0.02 * torch.randn(p, generator=gen)).clamp(-1, 1)
    g_re, g_c = torch.randn(p, generator=gen), torch.randn(p, generator=gen) * 0.05
    lazy = CandidateSet(x, x0, g_re, g_c, tuple(range(0, 30, 3)), 0.005, 0.05)
    whole = torch.stack([sign_step(x, x0, g_re - r * g_c, 0.005, 0.05) for r in lazy.ratios])
    assert all(torch.equal(lazy.values(j), whole[j]) for j in range(lazy.m))
    assert torch.equal(lazy.values(4, 17, 301), whole[4, 17:301])
    for start, stop in [(0, 30), (4, 11), (29, 30)]:
        assert torch.equal(layout.model_rows(lazy, start, stop, 8), layout.model_rows(whole, start, stop, 8))
    shard = lazy.shard(2, 5)
    assert shard.ratios == lazy.ratios[2:5] and torch.equal(shard.values(0), whole[2])
    uniform = GroupLayout(((3, SIDE, SIDE), (3, SIDE, SIDE)))
    x0, x, g_re, g_c, _, _ = synthetic(22)
    lazy = CandidateSet(x, x0, g_re, g_c, (0, 7, 40), 0.005, 0.05)
    whole = torch.stack([lazy.values(j) for j in range(3)])
    assert torch.equal(uniform.model_rows(lazy, 1, 6, 6), uniform.model_rows(whole, 1, 6, 6))


@pytest.mark.parametrize("span", [None, 1, 7, 64, 599])
def test_runs_are_found_span_by_span(monkeypatch, span):
    """Comparing consecutive candidates span by span finds exactly the runs whole candidates show."""
    for seed in range(3):
        x0, x, g_re, g_c, loss_fn, draw = synthetic(seed)
        every = CandidateSet(x, x0, g_re, g_c, tuple(range(0, 101)), 0.005, 0.05)
        whole = [sign_step(x, x0, g_re - r * g_c, 0.005, 0.05) for r in range(101)]
        assert repeats(every, span) == [r > 0 and torch.equal(whole[r], whole[r - 1]) for r in range(101)]
        if span is not None:
            monkeypatch.setattr(cap, "SPAN", span)
        ev = shared_scorer(loss_fn, draw, 6)
        ref = reference_search(x, x0, direction(g_re, g_c), range(0, 101), 0.005, 0.05, ev)
        fast = fast_search(x, x0, g_re, g_c, range(0, 101), 0.005, 0.05, ev, batch_size=5)
        assert (fast.ratio, fast.best_loss, fast.distinct, fast.losses) == (ref.ratio, ref.best_loss, ref.distinct,
                                                                            {r: ref.losses[r] for r in fast.losses})
        assert torch.equal(fast.next_x, ref.next_x)


def test_the_search_hands_the_evaluator_ratios_not_pixels():
    """Each scoring call gets a lazy CandidateSet of ≤ candidate_batch_size ratios over the group's own vectors."""
    x0, x, g_re, g_c, loss_fn, draw = synthetic(13)
    inner = InProcessEvaluator(loss_fn, LAYOUT, SIDE, 4)
    seen = []

    def evaluator(candidates, d):
        seen.append(candidates)
        return inner(candidates, d)

    scorer = CandidateScorer(evaluator, lambda r: [draw], True)
    fast = fast_search(x, x0, g_re, g_c, range(0, 51), 0.005, 0.05, scorer, batch_size=4)
    assert seen and all(isinstance(c, CandidateSet) and 1 <= c.m <= 4 for c in seen)
    assert all(c.x is x and c.grad_re is g_re and c.grad_cons is g_c for c in seen)  # shared, never copied
    assert sum(c.m for c in seen) == fast.distinct
    # the default (0): every distinct candidate in one call, with the same λ and pixels
    seen.clear()
    whole = fast_search(x, x0, g_re, g_c, range(0, 51), 0.005, 0.05, scorer, batch_size=0)
    assert len(seen) == 1 and seen[0].m == fast.distinct > 4
    assert (whole.ratio, whole.distinct) == (fast.ratio, fast.distinct) and torch.equal(whole.next_x, fast.next_x)


@pytest.fixture(scope="module")
def fp64_models(tiny_model_dir):
    """fp64 so that rounding cannot decide a near-tie (in exact arithmetic both searches are equal)."""
    from capray.attack.engine import load_models
    from capray.config import load_config

    return load_models(load_config(preset="smoke", overrides={"model": {"dtype": "fp64"}}).model)


@pytest.mark.slow  # the fast tier: test_engine_equivalence (every method and score draw, fewer steps)
def test_engine_fast_equals_reference_over_steps_and_groups(fp64_models, smoke_config):
    for seed, n in [(0, 4), (5, 3)]:
        gen = torch.Generator().manual_seed(seed)
        images = torch.rand(n, 3, 64, 64, generator=gen) * 2 - 1
        runs = {}
        for search in ("fast", "reference"):
            cfg = smoke_config(seed=seed, model={"dtype": "fp64"},
                               attack={"method": "fsmg", "pgd_steps": 4, "fsmg_train_steps": 0},
                               cap={"ratio_max": 12, "start_fraction": 0.0, "search": search})
            from capray import protect_group

            runs[search] = protect_group(images, cfg, identity=f"g{seed}", models=fp64_models)
        assert runs["fast"].lambda_schedule == runs["reference"].lambda_schedule
        assert all(r is not None for r in runs["fast"].lambda_schedule)
        for a, b in zip(runs["fast"].images, runs["reference"].images):
            assert torch.equal(a, b)
