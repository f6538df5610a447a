"""The robust mode's transforms (`attack.robust`): what happens to a photo between capray and the attacker.

Expectation over transformations (Athalye et al. 2018; MetaCloak's defence): the attack loss is taken
on T(x), T drawn per photo and per PGD step, so the perturbation that wins is one that survives T.
Each T is a chain crop → flip → resize → blur → JPEG, every link present with `probability`; every
link is differentiable (matmul resizes, a separable Gaussian equal to torchvision's, the JPEG approximation of
`diff_jpeg`). Parameters are drawn from a CPU generator seeded like every other draw, so a group gets
the same pixels wherever it runs, and all of them are drawn whichever links apply, so the stream
never shifts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from capray.attack.diff_jpeg import jpeg
from capray.attack.group import resize, resize_operators
from capray.config import RobustConfig
from capray.models.seeds import cpu_generator


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (radius 3σ, reflect padding), as torchvision's but in two 1-D passes, so a
    large σ on a large photo costs 2·(6σ + 1) taps per pixel rather than (6σ + 1)²."""
    h, w = image.shape[-2:]
    radius = max(1, min(math.ceil(3 * sigma), h - 1, w - 1))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = image.shape[-3]
    out = F.pad(image, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


@dataclass(frozen=True)
class Augment:
    """One photo's transform in one draw; each link None / False when it does not apply."""

    crop: tuple[float, float, float] | None = None  # (side fraction kept, top, left as fractions of the slack)
    flip: bool = False
    resize: float | None = None  # down by this factor, then back up
    blur: float | None = None  # Gaussian σ in pixels
    jpeg: int | None = None  # quality
    # This draw's resize matrices by size: a photo's M λ-candidate rows of a step share them, and they go
    # with the draw, as the sizes are random (a module-wide cache would keep GBs of stale ones at 12 MP).
    _operators: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def __reduce__(self):  # the parameters only: a peer actor builds its own matrices on its own device
        return Augment, (self.crop, self.flip, self.resize, self.blur, self.jpeg)

    def _resize_operators(self, *key) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in self._operators:
            self._operators[key] = resize_operators(*key)
        return self._operators[key]

    @property
    def is_identity(self) -> bool:
        return self == Augment()

    def describe(self) -> str:
        links = []
        if self.crop:
            links.append(f"crop×{self.crop[0]:.2f}")
        if self.flip:
            links.append("flip")
        if self.resize:
            links.append(f"resize×{self.resize:.2f}")
        if self.blur:
            links.append(f"blur σ{self.blur:.2f}")
        if self.jpeg:
            links.append(f"JPEG q{self.jpeg}")
        return " → ".join(links) or "none"

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → the same shape, differentiable."""
        if self.is_identity:
            return image
        h, w = image.shape[-2:]
        if self.crop:
            scale, top, left = self.crop
            ch, cw = max(1, round(h * scale)), max(1, round(w * scale))
            y, x = round(top * (h - ch)), round(left * (w - cw))
            image = resize(image[..., y: y + ch, x: x + cw], (h, w), self._resize_operators)
        if self.flip:
            image = torch.flip(image, dims=(-1,))
        if self.resize:
            small = (max(1, round(h * self.resize)), max(1, round(w * self.resize)))
            image = resize(resize(image, small, self._resize_operators), (h, w), self._resize_operators)
        if self.blur:
            image = gaussian_blur(image, self.blur)
        if self.jpeg:
            image = jpeg(image, self.jpeg)
        return image


def sample_augments(config: RobustConfig, n: int, *seed_parts: object) -> tuple[Augment, ...]:
    """n photos' transforms for one draw, from the generator seeded by (*seed_parts, "robust")."""
    gen = cpu_generator(*seed_parts, "robust")

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=gen, dtype=torch.float64))

    def applies() -> bool:
        return float(torch.rand((), generator=gen, dtype=torch.float64)) < config.probability

    out = []
    for _ in range(n):
        crop = (applies(), uniform(*config.crop_scale or (1.0, 1.0)), uniform(0, 1), uniform(0, 1))
        flip = applies()
        down = (applies(), uniform(*config.resize_factor or (1.0, 1.0)))
        blur = (applies(), uniform(*config.blur_sigma or (0.0, 0.0)))
        low, high = config.jpeg_quality or (100, 100)
        quality = (applies(), int(torch.randint(low, high + 1, (), generator=gen)))
        out.append(Augment(
            crop=crop[1:] if crop[0] and config.crop_scale and crop[1] < 1 else None,
            flip=flip and config.flip,
            resize=down[1] if down[0] and config.resize_factor and down[1] < 1 else None,
            blur=blur[1] if blur[0] and config.blur_sigma else None,
            jpeg=quality[1] if quality[0] and config.jpeg_quality else None,
        ))
    return tuple(out)
