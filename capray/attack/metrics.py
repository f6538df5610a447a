"""Visibility of a perturbation: L∞ in 0..255 units, PSNR and SSIM (scikit-image) per photo."""

from __future__ import annotations

import numpy as np
import torch

from capray.models.pixels import from_uint8, to_uint8

__all__ = ["from_uint8", "image_metrics", "to_uint8"]  # the conversions are used from here too (attack.api)


def image_metrics(clean: torch.Tensor, protected: torch.Tensor) -> dict[str, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a, b = to_uint8(clean), to_uint8(protected)
    linf = float(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
    psnr = float(peak_signal_noise_ratio(a, b, data_range=255)) if linf > 0 else float("inf")
    ssim = float(structural_similarity(a, b, channel_axis=2, data_range=255))
    return {"linf_255": linf, "psnr": psnr, "ssim": ssim}
