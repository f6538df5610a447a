"""SimAC's adaptive greedy timestep selection (somuchtome/SimAC `select_timestep`), per photo.

Runs once, before the outer loops, on the pretrained model: while a photo's candidate set is larger
than `keep_timesteps` (at most `max_select_iters` rounds), score a few sampled timesteps by the L1
norm of the input gradient, drop a window around the weakest one, and take one PGD step on a local
copy at the strongest one (that copy is discarded; only the timesteps are kept). Unlike the public
code, a set that has not shrunk enough after the last round is kept as it is instead of crashing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from capray.attack.pgd import sign_step
from capray.attack.randomness import cpu_generator
from capray.config import SimACConfig


def select_timesteps(
    image_loss: Callable[[torch.Tensor, int, int], torch.Tensor],
    images: list[torch.Tensor],
    cfg: SimACConfig,
    alpha: float,
    eps: float,
    num_train_timesteps: int,
    seed_parts: tuple[Any, ...],
) -> list[torch.Tensor]:
    """`image_loss(x, i, t)` is photo i's reconstruction loss at timestep t. Returns one pool per photo."""
    pools = []
    for i, x0 in enumerate(images):
        gen = cpu_generator(*seed_parts, i)
        keep = torch.ones(num_train_timesteps, dtype=torch.bool)
        x = x0.clone()
        for _ in range(cfg.max_select_iters):
            alive = keep.nonzero().flatten()
            if len(alive) <= cfg.keep_timesteps:
                break
            samples = alive[torch.randperm(len(alive), generator=gen)[: cfg.samples_per_iter]]
            scores, grads = [], []
            for t in samples.tolist():
                xr = x.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(image_loss(xr, i, t), xr)
                scores.append(float(grad.abs().sum()))
                grads.append(grad)
            weakest = int(samples[int(torch.tensor(scores).argmin())])
            strongest = int(torch.tensor(scores).argmax())
            centre = min(max(weakest, cfg.delta_t), num_train_timesteps - cfg.delta_t)
            keep[centre - cfg.delta_t: centre + cfg.delta_t] = False
            x = sign_step(x, x0, grads[strongest], alpha, eps).detach()
        pools.append(keep.nonzero().flatten())
    return pools
