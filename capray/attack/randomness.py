"""Explicit randomness: every draw comes from a generator seeded by (run seed, identity, purpose, step).

The λ search compares candidates under common random numbers, and the same config + seed gives the
same pixels through every front door. Draws are made on the CPU and moved to the device, so a CPU and
a GPU run see the same timesteps and noise.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from capray.attack.robust import Augment, sample_augments
from capray.config import RobustConfig
from capray.models.seeds import cpu_generator, derive_seed

__all__ = ["NoiseDraw", "cpu_generator", "derive_seed", "draw_noise"]  # the seeds are used from here too


@dataclass(frozen=True)
class NoiseDraw:
    """Timesteps, diffusion noise and VAE-posterior noise for one batch of N images, and (robust mode)
    each image's transform."""

    timesteps: torch.Tensor  # (N,) long
    noise: torch.Tensor  # (N, C, h, w)
    vae_noise: torch.Tensor  # (N, C, h, w)
    augments: tuple[Augment, ...] | None = None  # `attack.robust`: one per image; None: the photos as written

    def select(self, index: torch.Tensor) -> NoiseDraw:
        """The given rows, e.g. `arange(q0, q1) % N` for a chunk of candidate-major scoring rows."""
        augments = None if self.augments is None else tuple(self.augments[i] for i in index.tolist())
        return NoiseDraw(self.timesteps[index], self.noise[index], self.vae_noise[index], augments)

    def rows(self, start: int, stop: int) -> NoiseDraw:
        """Rows start..stop-1 (e.g. the instance vs class halves of a training batch)."""
        augments = None if self.augments is None else self.augments[start:stop]
        return NoiseDraw(self.timesteps[start:stop], self.noise[start:stop], self.vae_noise[start:stop], augments)

    def cpu(self) -> NoiseDraw:
        return replace(self, timesteps=self.timesteps.cpu(), noise=self.noise.cpu(), vae_noise=self.vae_noise.cpu())


def draw_noise(
    n: int,
    latent_shape: tuple[int, int, int],
    *seed_parts: object,
    num_train_timesteps: int = 1000,
    timestep_pools: list[torch.Tensor] | None = None,
    fixed_timestep: int | None = None,
    robust: RobustConfig | None = None,
) -> NoiseDraw:
    """One draw for `n` images: uniform timesteps (or from per-image pools, SimAC), Gaussian noises, and
    with `robust` on, each image's transform (from its own generator: the noises are the same either way)."""
    gen = cpu_generator(*seed_parts)
    if fixed_timestep is not None:
        timesteps = torch.full((n,), int(fixed_timestep), dtype=torch.long)
    elif timestep_pools is not None:
        picks = [int(torch.randint(len(pool), (1,), generator=gen)) for pool in timestep_pools]
        timesteps = torch.stack([pool[i] for pool, i in zip(timestep_pools, picks)]).long()
    else:
        timesteps = torch.randint(0, num_train_timesteps, (n,), generator=gen)
    noise = torch.randn((n, *latent_shape), generator=gen)
    vae_noise = torch.randn((n, *latent_shape), generator=gen)
    augments = sample_augments(robust, n, *seed_parts) if robust is not None and robust.enabled else None
    return NoiseDraw(timesteps, noise, vae_noise, augments)
