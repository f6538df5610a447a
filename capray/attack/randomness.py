"""Explicit randomness: every draw comes from a generator seeded by (run seed, identity, purpose, step).

The λ search compares candidates under common random numbers, and the same config + seed gives the
same pixels through every front door. Draws are made on the CPU and moved to the device, so a CPU and
a GPU run see the same timesteps and noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from capray.models.seeds import cpu_generator, derive_seed

__all__ = ["NoiseDraw", "cpu_generator", "derive_seed", "draw_noise"]  # the seeds are used from here too


@dataclass(frozen=True)
class NoiseDraw:
    """Timesteps, diffusion noise and VAE-posterior noise for one batch of N images."""

    timesteps: torch.Tensor  # (N,) long
    noise: torch.Tensor  # (N, C, h, w)
    vae_noise: torch.Tensor  # (N, C, h, w)

    def select(self, index: torch.Tensor) -> NoiseDraw:
        """The given rows, e.g. `arange(q0, q1) % N` for a chunk of candidate-major scoring rows."""
        return NoiseDraw(self.timesteps[index], self.noise[index], self.vae_noise[index])

    def rows(self, start: int, stop: int) -> NoiseDraw:
        """Rows start..stop-1 (e.g. the instance vs class halves of a training batch)."""
        return NoiseDraw(self.timesteps[start:stop], self.noise[start:stop], self.vae_noise[start:stop])


def draw_noise(
    n: int,
    latent_shape: tuple[int, int, int],
    *seed_parts: object,
    num_train_timesteps: int = 1000,
    timestep_pools: list[torch.Tensor] | None = None,
    fixed_timestep: int | None = None,
) -> NoiseDraw:
    """One draw for `n` images: uniform timesteps (or from per-image pools, SimAC), Gaussian noises."""
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
    return NoiseDraw(timesteps, noise, vae_noise)
