"""A group of photos as one flat tensor, at the photos' original resolutions.

PGD runs in the original pixel space: the perturbation of photo i has photo i's own shape, so ε holds
at the resolution that gets published. The model sees each photo through the same differentiable
resize-shorter-side + center-crop that DreamBooth training applies (Anti-DreamBooth `load_data`).
Keeping the whole group in one flat vector makes the sign step, the projection and the λ-candidate
construction single tensor operations whatever the photo sizes are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

PhotoTransform = Callable[[torch.Tensor], torch.Tensor]  # (1, 3, H, W) → same shape: e.g. `robust.Augment`


@lru_cache(maxsize=64)
def _resize_matrix(src: int, dst: int) -> torch.Tensor:
    """The (dst, src) matrix of 1-D antialiased bilinear resampling, read off `F.interpolate` on the identity."""
    eye = torch.eye(src, dtype=torch.float64).view(1, 1, src, src)
    return F.interpolate(eye, size=(dst, src), mode="bilinear", antialias=True, align_corners=False)[0, 0]


@lru_cache(maxsize=32)
def _crop_operators(h: int, w: int, size: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(rows (size, h), cols (size, w)) of `resize_center_crop` for one photo size, on the device.

    Cached so a PGD step does not rebuild them and copy them host→device for every photo of every
    forward; 32 sizes of 12 MP photos hold about 0.5 GB on the device in fp32.
    """
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    rows = _resize_matrix(h, new_h)[top: top + size].to(device, dtype)
    cols = _resize_matrix(w, new_w)[left: left + size].to(device, dtype)
    return rows, cols


def resize_operators(h: int, w: int, new_h: int, new_w: int, dtype: torch.dtype,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (new_h, h), cols (new_w, w)) of `resize`, built afresh on the device: for sizes drawn at random
    (the robust mode's), which the long-lived caches here would only fill (at 12 MP, ~70 MB a pair)."""
    build = _resize_matrix.__wrapped__
    return build(h, new_h).to(device, dtype), build(w, new_w).to(device, dtype)


_recurring_resize_operators = lru_cache(maxsize=64)(resize_operators)  # sizes set by the photo (JPEG's chroma)
ResizeOperators = Callable[[int, int, int, int, torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]]


def resize(image: torch.Tensor, size: tuple[int, int],
           operators: ResizeOperators = _recurring_resize_operators) -> torch.Tensor:
    """(B,C,H,W) → (B,C,h,w): `F.interpolate`'s antialiased bilinear as two matrix products, so its
    backward is deterministic on CUDA too (the robust mode's transforms resize inside the attack loss).
    `operators` supplies the matrices: cached per size by default, or the caller's own store."""
    h, w = image.shape[-2:]
    if (h, w) == tuple(size):
        return image
    rows, cols = operators(h, w, int(size[0]), int(size[1]), image.dtype, image.device)
    return rows @ image @ cols.T


def resize_center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """(B,3,H,W) → (B,3,size,size): antialiased bilinear resize of the shorter side, then center crop.

    The resize is separable, so it runs as two matrix products with `F.interpolate`'s own weights
    (only the rows the crop keeps): same values up to rounding, but its backward is a matmul, which is
    deterministic on CUDA where interpolate's backward (atomic adds) is not.
    """
    h, w = image.shape[-2:]
    if (h, w) == (size, size):
        return image
    rows, cols = _crop_operators(h, w, size, image.dtype, image.device)
    return rows @ image @ cols.T


@dataclass(frozen=True)
class PhotoBatch:
    """Photos start..stop-1 of a group: their span in the flat vector and their own layout."""

    start: int
    stop: int
    flat: slice
    layout: GroupLayout


@dataclass(frozen=True)
class GroupLayout:
    shapes: tuple[tuple[int, int, int], ...]  # (3, H, W) per photo

    @classmethod
    def of(cls, images: list[torch.Tensor]) -> GroupLayout:
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

    def batches(self, size: int) -> list[PhotoBatch]:
        """The group cut into micro-batches of at most `size` photos, in order."""
        offsets = self.offsets()
        return [PhotoBatch(i, min(i + size, self.n), slice(offsets[i], offsets[min(i + size, self.n)]),
                           GroupLayout(self.shapes[i: i + size])) for i in range(0, self.n, size)]

    def offsets(self) -> list[int]:
        """Where each photo starts in the flat vector, and (last) its length."""
        out = [0]
        for s in self.sizes():
            out.append(out[-1] + s)
        return out

    def model_rows(self, candidates, start: int, stop: int, resolution: int,
                   augments: Sequence[PhotoTransform] | None = None) -> torch.Tensor:
        """Rows start..stop-1 of the candidate-major image list of M candidates, at model resolution.

        Row q is photo q mod N of candidate q div N. `candidates`: flat rows (M, P), or anything whose
        `values(m, a, b)` gives elements a..b-1 of candidate m (a lazy `cap.CandidateSet`): only those
        rows' photos are built and resized, so scoring memory is set by stop − start, not by M·N.
        `augments`: one transform per photo (the robust mode's draw), applied at the photo's own size.
        """
        if isinstance(candidates, torch.Tensor):
            if self.uniform and augments is None:
                return resize_center_crop(candidates.reshape(-1, *self.shapes[0])[start:stop], resolution)
            rows = candidates

            def values(m: int, a: int, b: int) -> torch.Tensor:
                return rows[m, a:b]
        else:
            values = candidates.values
        offsets = self.offsets()

        def photo(q: int) -> torch.Tensor:
            m, i = divmod(q, self.n)
            image = values(m, offsets[i], offsets[i + 1]).view(self.shapes[i])
            return image if augments is None else augments[i](image.unsqueeze(0))[0]

        # photo by photo, whatever the sizes: only one photo at original resolution exists at a time
        # (stacking a chunk of 32 photos of 12 MP first would hold 4.6 GB, twice)
        return torch.cat([resize_center_crop(photo(q).unsqueeze(0), resolution) for q in range(start, stop)])

    def to_model(self, flat: torch.Tensor, resolution: int,
                 augments: Sequence[PhotoTransform] | None = None) -> torch.Tensor:
        """Flat group (P,) or candidates (M, P) → model input (N, 3, r, r) or (M·N, 3, r, r).

        `augments`: one transform per photo (the robust mode's draw), applied at the photo's own size
        before the resize, as a platform re-encodes the photo it publishes.
        """
        batch = flat.reshape(-1, flat.shape[-1])
        m = batch.shape[0]
        if self.uniform and augments is None:
            images = batch.reshape(m * self.n, *self.shapes[0])
            return resize_center_crop(images, resolution)
        out = []
        for row in batch:
            for i, (part, shape) in enumerate(zip(row.split(self.sizes()), self.shapes)):
                photo = part.view(1, *shape)
                out.append(resize_center_crop(photo if augments is None else augments[i](photo), resolution))
        return torch.cat(out)
