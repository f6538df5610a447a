"""Loss values against independent hand computations, and the PGD projection invariant."""

from __future__ import annotations

import itertools

import torch

from capray.attack.losses import consistency_from_stats, consistency_part, gram
from capray.attack.pgd import project, sign_step


def hand_gram(f: torch.Tensor) -> torch.Tensor:
    c, h, w = f.shape
    out = torch.zeros(c, c, dtype=torch.float64)
    for i, j in itertools.product(range(c), range(c)):
        out[i, j] = sum(float(f[i, y, x]) * float(f[j, y, x]) for y in range(h) for x in range(w))
    return out


def test_gram_matches_eq12_and_element_normalisation():
    feats = torch.randn(3, 2, 2, 3, dtype=torch.float64)
    raw = gram(feats, "none").double()
    for b in range(3):
        torch.testing.assert_close(raw[b], hand_gram(feats[b]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gram(feats, "elements").double(), raw / (2 * 2 * 3), rtol=1e-6, atol=1e-6)


def test_consistency_is_mean_squared_distance_to_the_mean_gram():
    grams = [torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[3.0, 2.0], [2.0, 1.0]]])]
    # mean = [[2,1],[1,1]]; ‖G1−Ḡ‖² = 1+1+1+0 = 3, ‖G2−Ḡ‖² = 1+1+1+0 = 3 → (3+3)/2 = 3
    assert float(consistency_from_stats(grams)) == 3.0
    two_layers = grams + [torch.tensor([[[2.0]], [[4.0]]])]  # second layer: ((1)²+(1)²)/2 = 1
    assert float(consistency_from_stats(two_layers)) == 4.0


def test_micro_batch_shares_sum_to_the_consistency_loss_and_its_gradient():
    """The engine's shares (S̄ computed beforehand, without grad) give the loss of Eq. 14–15 and its gradient."""
    images = torch.rand(5, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    full = consistency_from_stats([gram(images, "elements")])  # S̄ inside the graph
    (expected_grad,) = torch.autograd.grad(full, images)
    with torch.no_grad():
        means = [gram(images, "elements").mean(dim=0, keepdim=True)]
    shares = [consistency_part([gram(images[a:b], "elements")], means, 5) for a, b in ((0, 2), (2, 3), (3, 5))]
    torch.testing.assert_close(sum(shares), full, rtol=1e-12, atol=0)
    (grad,) = torch.autograd.grad(sum(shares), images)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-14)
    same = torch.rand(1, 3, 4, 4, dtype=torch.float64).repeat(3, 1, 1, 1)  # identical photos: nothing to pull
    assert float(consistency_part([gram(same, "elements")], [gram(same[:1], "elements")], 3)) == 0.0


def test_projection_keeps_eps_ball_and_range_over_many_steps():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(5000, generator=gen) * 2 - 1
    x0[:10] = torch.tensor([-1.0, 1.0] * 5)  # photos often touch the range limits
    x, eps, alpha = x0.clone(), 0.05, 0.005
    for _ in range(40):
        x = sign_step(x, x0, torch.randn(5000, generator=gen), alpha, eps)
        assert (x - x0).abs().max() <= eps + 1e-7
        assert x.min() >= -1 and x.max() <= 1
    assert (x - x0).abs().max() > eps - alpha  # it really moved to the boundary
    assert torch.equal(project(x0, x0, eps), x0)


def test_simac_feature_loss_is_the_public_codes_mse_over_the_stacked_resnets():
    """SimAC's code: F.mse_loss(stack(perturbed features), stack(clean features)), i.e. the mean of the
    three ResNets' MSEs; micro-batch shares add up to it; 'sum' is three times that for three ResNets."""
    from capray.attack.losses import feature_interference

    gen = torch.Generator().manual_seed(3)
    perturbed = [torch.randn(4, 5, 6, 6, generator=gen) for _ in range(3)]
    clean = [torch.randn(4, 5, 6, 6, generator=gen) for _ in range(3)]
    public = torch.nn.functional.mse_loss(torch.stack(perturbed), torch.stack(clean))
    assert torch.allclose(feature_interference(perturbed, clean), public)
    shares = sum(feature_interference([p[a:b] for p in perturbed], [c[a:b] for c in clean], share=(b - a) / 4)
                 for a, b in ((0, 1), (1, 4)))
    assert torch.allclose(shares, public)
    assert torch.allclose(feature_interference(perturbed, clean, reduction="sum"), 3 * public)
