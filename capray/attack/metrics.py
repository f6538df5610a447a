"""Visibility of a perturbation: L∞ in 0..255 units, PSNR and SSIM (scikit-image) per photo."""

from __future__ import annotations

import numpy as np
import torch


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] → (H, W, 3) uint8, rounding to nearest (the PNG the user gets)."""
    arr = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return arr.permute(1, 2, 0).numpy()


def from_uint8(array: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 → (3, H, W) float32 in [-1, 1]; exact inverse of `to_uint8` on the grid."""
    return torch.from_numpy(np.array(array, dtype=np.uint8, order="C")).permute(2, 0, 1).float() / 127.5 - 1.0


def image_metrics(clean: torch.Tensor, protected: torch.Tensor) -> dict[str, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a, b = to_uint8(clean), to_uint8(protected)
    linf = float(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
    psnr = float(peak_signal_noise_ratio(a, b, data_range=255)) if linf > 0 else float("inf")
    ssim = float(structural_similarity(a, b, channel_axis=2, data_range=255))
    return {"linf_255": linf, "psnr": psnr, "ssim": ssim}
