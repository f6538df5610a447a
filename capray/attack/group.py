"""A group of photos as one flat tensor, at the photos' original resolutions.

PGD runs in the original pixel space: the perturbation of photo i has photo i's own shape, so ε holds
at the resolution that gets published. The model sees each photo through the same differentiable
resize-shorter-side + center-crop that DreamBooth training applies (Anti-DreamBooth `load_data`).
Keeping the whole group in one flat vector makes the sign step, the projection and the λ-candidate
construction single tensor operations whatever the photo sizes are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def resize_center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """(B,3,H,W) → (B,3,size,size): antialiased bilinear resize of the shorter side, then center crop."""
    h, w = image.shape[-2:]
    if (h, w) == (size, size):
        return image
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        image = F.interpolate(image, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return image[..., top: top + size, left: left + size]


@dataclass(frozen=True)
class GroupLayout:
    shapes: tuple[tuple[int, int, int], ...]  # (3, H, W) per photo

    @classmethod
    def of(cls, images: list[torch.Tensor]) -> "GroupLayout":
        return cls(tuple(tuple(img.shape) for img in images))  # type: ignore[misc]

    @property
    def n(self) -> int:
        return len(self.shapes)

    @property
    def uniform(self) -> bool:
        return len(set(self.shapes)) == 1

    def sizes(self) -> list[int]:
        return [c * h * w for c, h, w in self.shapes]

    def flatten(self, images: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([img.reshape(-1) for img in images])

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [part.view(shape) for part, shape in zip(flat.split(self.sizes(), dim=-1), self.shapes)]

    def to_model(self, flat: torch.Tensor, resolution: int) -> torch.Tensor:
        """Flat group (P,) or candidates (M, P) → model input (N, 3, r, r) or (M·N, 3, r, r)."""
        batch = flat.reshape(-1, flat.shape[-1])
        m = batch.shape[0]
        if self.uniform:
            images = batch.reshape(m * self.n, *self.shapes[0])
            return resize_center_crop(images, resolution)
        out = []
        for row in batch:
            for part, shape in zip(row.split(self.sizes()), self.shapes):
                out.append(resize_center_crop(part.view(1, *shape), resolution))
        return torch.cat(out)
