"""A differentiable JPEG round trip: what a re-encode at quality Q does to a photo, with a gradient.

Baseline JPEG as libjpeg (and so PIL) writes it: JFIF YCbCr, 4:2:0 chroma subsampling (2×2 mean),
8×8 block DCT, the standard quantization tables scaled by quality (libjpeg's formula), then the
decoder's inverse DCT, range clamp and "fancy" (bilinear) chroma upsampling. The one non-differentiable
step, rounding the quantized coefficients, is replaced by Shin & Song's approximation
round(x) + (x − round(x))³ (NeurIPS-W 2017; also DiffJPEG's): within 0.125 of a quantization step of
the true value, and its gradient is small where a coefficient is far from being kept, so the attack
learns to put its energy where JPEG keeps it. Every op is a reshape, a matmul or elementwise, so the
backward is deterministic on CUDA as well. `tests/test_robust.py` compares it with PIL's encoder.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from capray.attack.group import resize

# ITU T.81 Annex K tables (quality 50)
_LUMA = [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
         14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
         49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99]
_CHROMA = [17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
           47, 66, 99, 99, 99, 99, 99, 99] + [99] * 32
_RGB_TO_YCC = [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]
_YCC_TO_RGB = [[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]]
_CHROMA_OFFSET = [0.0, 128.0, 128.0]


def quality_table(base: list[int], quality: int) -> torch.Tensor:
    """libjpeg's `jpeg_quality_scaling` applied to a base table, as an (8, 8) float64 tensor."""
    q = min(max(int(quality), 1), 100)
    scale = 5000 / q if q < 50 else 200 - 2 * q
    return torch.tensor([min(max((v * scale + 50) // 100, 1), 255) for v in base], dtype=torch.float64).view(8, 8)


@lru_cache(maxsize=32)
def _constants(quality: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    k = torch.arange(8, dtype=torch.float64)
    dct = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * torch.where(
        k[:, None] == 0, math.sqrt(1 / 8), math.sqrt(2 / 8))  # orthonormal DCT-II: D[u, x]
    tensors = (dct, quality_table(_LUMA, quality), quality_table(_CHROMA, quality), torch.tensor(_RGB_TO_YCC),
               torch.tensor(_YCC_TO_RGB), torch.tensor(_CHROMA_OFFSET).view(1, 3, 1, 1))
    return tuple(t.to(device, dtype) for t in tensors)


def soft_round(x: torch.Tensor) -> torch.Tensor:
    """round(x) + (x − round(x))³: close to rounding, with a gradient everywhere."""
    r = torch.round(x)
    return r + (x - r) ** 3


def _codec(plane: torch.Tensor, table: torch.Tensor, dct: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) level-shifted samples (H, W multiples of 8) → the same after DCT, quantization, IDCT."""
    b, c, h, w = plane.shape
    blocks = plane.reshape(b, c, h // 8, 8, w // 8, 8).transpose(3, 4)  # (…, 8, 8) blocks
    coefficients = dct @ blocks @ dct.T
    quantized = soft_round(coefficients / table) * table
    return (dct.T @ quantized @ dct).transpose(3, 4).reshape(b, c, h, w)


def _pad_to(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """Repeat the last row and column up to a multiple (as an encoder pads partial MCUs); expand-based,
    so the backward is a deterministic sum."""
    h, w = image.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph:
        image = torch.cat([image, image[..., -1:, :].expand(*image.shape[:-2], ph, image.shape[-1])], dim=-2)
    if pw:
        image = torch.cat([image, image[..., -1:].expand(*image.shape[:-1], pw)], dim=-1)
    return image


def jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] → its JPEG round trip at `quality`, same shape and range, differentiable."""
    dct, luma, chroma, to_ycc, to_rgb, offset = _constants(int(quality), image.dtype, image.device)
    h, w = image.shape[-2:]
    rgb = _pad_to((image + 1) * 127.5, 16)
    ycc = torch.einsum("ij,bjhw->bihw", to_ycc, rgb) + offset
    b, _, ph, pw = ycc.shape
    luma_plane = ycc[:, :1] - 128
    chroma_planes = ycc[:, 1:].reshape(b, 2, ph // 2, 2, pw // 2, 2).mean(dim=(3, 5)) - 128  # 4:2:0
    y = (_codec(luma_plane, luma, dct) + 128).clamp(0, 255)
    cbcr = (_codec(chroma_planes, chroma, dct) + 128).clamp(0, 255)
    cbcr = resize(cbcr, (ph, pw))  # the decoder's fancy upsampling is bilinear at 2×
    out = torch.einsum("ij,bjhw->bihw", to_rgb, torch.cat([y, cbcr], dim=1) - offset).clamp(0, 255)
    return out[..., :h, :w] / 127.5 - 1
