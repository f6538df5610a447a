"""Losses: diffusion reconstruction (with explicit randomness), Gram/consistency, content, SimAC features."""

from __future__ import annotations

from typing import Any, Literal

import torch

from capray.attack.randomness import NoiseDraw


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Losses accumulate in fp32 even for bf16/fp16 models (and in fp64 for fp64 exactness runs)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def vae_latents(vae: Any, images: torch.Tensor, vae_noise: torch.Tensor) -> torch.Tensor:
    """Reparameterised VAE posterior sample (mean + std·noise) scaled for the UNet; differentiable."""
    dist = vae.encode(images.to(vae.dtype)).latent_dist
    return (dist.mean + dist.std * vae_noise) * vae.config.scaling_factor


def diffusion_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def reconstruction_loss(
    parts: Any,
    unet: Any,
    cond: torch.Tensor,
    images: torch.Tensor,
    draw: NoiseDraw,
) -> torch.Tensor:
    """Per-image DreamBooth loss ‖ε̂(z_t, t, S) − ε‖² (mean over latent elements), shape (B,).

    The sum over a group is L_re of CAP Eq. 9; the mean is Anti-DreamBooth's loss. `draw` holds B
    rows (`NoiseDraw.select` picks the rows of several candidates of one group).
    """
    latents = vae_latents(parts.vae, images, draw.vae_noise.to(images.device, parts.vae.dtype))
    noise = draw.noise.to(latents.device, latents.dtype)
    timesteps = draw.timesteps.to(latents.device)
    noisy = parts.scheduler.add_noise(latents, noise, timesteps)
    hidden = cond.expand(images.shape[0], -1, -1).to(unet.dtype)
    pred = unet(noisy.to(unet.dtype), timesteps, encoder_hidden_states=hidden).sample
    target = diffusion_target(parts.scheduler, latents, noise, timesteps)
    return (_at_least_fp32(pred) - _at_least_fp32(target)).pow(2).mean(dim=(1, 2, 3))


def gram(features: torch.Tensor, normalization: Literal["elements", "none"]) -> torch.Tensor:
    """G = F·Fᵀ with F of shape (C, H·W) per image (Eq. 12); optionally divided by C·H·W."""
    b, c, h, w = features.shape
    flat = _at_least_fp32(features).reshape(b, c, h * w)
    g = flat @ flat.transpose(1, 2)
    return g / (c * h * w) if normalization == "elements" else g


def consistency_from_stats(stats: list[torch.Tensor]) -> torch.Tensor:
    """(1/N)·Σᵢ ‖Sᵢ − S̄‖² summed over layers (Eq. 14–15); S is a Gram matrix or a feature map.

    The loss as the paper defines it, over the whole group at once. The engine computes it in
    micro-batch shares (`consistency_part`) so memory does not grow with N; tests hold the two equal.
    """
    total = stats[0].new_zeros(())
    for s in stats:
        mean = s.mean(dim=0, keepdim=True)
        total = total + (s - mean).pow(2).flatten(1).sum(dim=1).mean()
    return total


def style_stats(
    style_net: Any,
    images: torch.Tensor,
    *,
    kind: Literal["style", "content"] = "style",
    normalization: Literal["elements", "none"] = "elements",
) -> list[torch.Tensor]:
    """Per-image statistics S the consistency loss compares, one (B, …) tensor per layer."""
    feats = style_net(images)
    if kind == "style":
        return [gram(f, normalization) for f in feats]
    # ablation: pull raw feature maps (content) toward the group mean
    return [_at_least_fp32(f) / (f[0].numel() if normalization == "elements" else 1) for f in feats]


def consistency_part(stats: list[torch.Tensor], means: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """A micro-batch's share (1/N)·Σ_{i in batch} ‖Sᵢ − S̄‖² of the consistency loss, S̄ held fixed.

    The shares sum to the loss, and their gradients sum to its gradient: ∂L/∂Sᵢ = (2/N)(Sᵢ − S̄)
    because the deviations from the mean sum to zero, so S̄ may be computed beforehand without grad.
    """
    total = stats[0].new_zeros(())
    for s, mean in zip(stats, means):
        total = total + (s - mean).pow(2).flatten(1).sum(dim=1).sum() / group_size
    return total


class FeatureTap:
    """Records the conv2 outputs of the ResNets in the UNet decoder's highest-resolution block (SimAC)."""

    def __init__(self, unet: Any):
        self.outputs: list[torch.Tensor] = []
        self.enabled = False
        self._handles = [res.conv2.register_forward_hook(self._hook) for res in unet.up_blocks[-1].resnets]

    def _hook(self, _module: Any, _inp: Any, out: torch.Tensor) -> None:
        if self.enabled:
            self.outputs.append(out)

    def capture(self) -> FeatureTap:
        self.outputs = []
        self.enabled = True
        return self

    def release(self) -> list[torch.Tensor]:
        self.enabled = False
        out, self.outputs = self.outputs, []
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def feature_interference(perturbed: list[torch.Tensor], clean: list[torch.Tensor], share: float = 1.0,
                         reduction: Literal["mean", "sum"] = "mean") -> torch.Tensor:
    """SimAC's feature loss: MSE between perturbed and clean decoder features of the block's ResNets.

    `reduction` "mean": their mean, which is the public code's one MSE over the stacked features (the
    ResNets' outputs have one shape); "sum": their sum. `share` = micro-batch size / group size, so
    that micro-batch losses add up to the group's.
    """
    total = sum(torch.nn.functional.mse_loss(_at_least_fp32(p), _at_least_fp32(c).detach()) * share
                for p, c in zip(perturbed, clean))
    return total / len(perturbed) if reduction == "mean" else total
