"""The PGD sign step and its projection onto the ε-ball and the valid image range."""

from __future__ import annotations

import torch


def project(x: torch.Tensor, x0: torch.Tensor, eps: float) -> torch.Tensor:
    """Clip to ‖x − x0‖∞ ≤ ε, then to [-1, 1] (x0 is in range, so both constraints hold)."""
    return torch.clamp(torch.minimum(torch.maximum(x, x0 - eps), x0 + eps), -1.0, 1.0)


def sign_step(x: torch.Tensor, x0: torch.Tensor, direction: torch.Tensor, alpha: float, eps: float) -> torch.Tensor:
    """One ascent step x + α·sign(direction), projected. Works on (P,) and on (M, P) candidates."""
    return project(x + alpha * torch.sign(direction), x0, eps)
