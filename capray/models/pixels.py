"""Photos as tensors and back: the one conversion between uint8 pixels and the models' [-1, 1] range.

It lives with the models (the class images are read back through it) so that nothing below the engine
has to import the engine for it; `capray.attack.metrics` uses the same functions.
"""

from __future__ import annotations

import numpy as np
import torch


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] → (H, W, 3) uint8, rounding to nearest (the PNG the user gets)."""
    arr = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return arr.permute(1, 2, 0).numpy()


def unit_to_uint8(image: np.ndarray) -> np.ndarray:
    """A float image on [0, 1] (a diffusers pipeline's `output_type="np"`, a scikit-image filter's result)
    → uint8, clipped and rounded to nearest, as the file an attacker saves holds it."""
    return (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def from_uint8(array: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 → (3, H, W) float32 in [-1, 1]; exact inverse of `to_uint8` on the grid."""
    pixels = np.array(array, dtype=np.uint8, order="C")  # a copy: the caller's array may be read-only
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1.0
