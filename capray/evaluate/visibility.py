"""How visible a protection is: PSNR, SSIM and L∞ of protected vs clean (the engine's own formulas),
and LPIPS when the `lpips` package and its backbone weights are already on disk."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from capray.attack.metrics import from_uint8, image_metrics
from capray.evaluate.faces import BackendUnavailable

ALEXNET_CHECKPOINT = "alexnet-owt-7be5be79.pth"


def visibility(clean: np.ndarray, protected: np.ndarray) -> dict[str, float]:
    """L∞ (0..255), PSNR and SSIM of two same-size HxWx3 uint8 photos."""
    if clean.shape != protected.shape:
        raise ValueError(f"size mismatch: clean {clean.shape} vs protected {protected.shape}")
    return image_metrics(from_uint8(np.array(clean)), from_uint8(np.array(protected)))


class LpipsBackend:
    name = "LPIPS (AlexNet)"

    def __init__(self):
        try:
            import lpips
            import torch
        except ImportError as exc:
            raise BackendUnavailable("the lpips package is not installed") from exc
        hub = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_CHECKPOINT
        if not hub.is_file():  # lpips would try to download ImageNet AlexNet weights
            raise BackendUnavailable(f"AlexNet weights not found at {hub}")
        self._model = lpips.LPIPS(net="alex", verbose=False).eval()

    def score(self, clean: np.ndarray, protected: np.ndarray) -> float:
        import torch

        with torch.no_grad():
            return float(self._model(from_uint8(clean)[None], from_uint8(protected)[None]).item())


@functools.lru_cache(maxsize=1)
def load_lpips() -> LpipsBackend:
    return LpipsBackend()


def lpips_or_reason() -> tuple[LpipsBackend | None, str | None]:
    try:
        return load_lpips(), None
    except BackendUnavailable as exc:
        return None, str(exc)
