"""Robustness transforms an attacker may apply to protected photos before fine-tuning.

Spec strings (config `evaluate.transforms`, CLI `--transform`): ``jpeg:Q`` (re-encode at quality Q),
``blur:SIGMA`` (Gaussian blur, σ in pixels), ``resize:F`` (down by factor F in (0, 1), then back up,
bicubic). Each transform keeps the photo's size and runs on uint8 RGB, like a real re-upload would.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter


@dataclass(frozen=True)
class Transform:
    kind: str
    value: float

    @property
    def label(self) -> str:
        return {"jpeg": f"JPEG q{int(self.value)}", "blur": f"blur σ{self.value:g}",
                "resize": f"resize ×{self.value:g}"}[self.kind]

    @property
    def slug(self) -> str:
        return f"{self.kind}{self.value:g}"

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        img = Image.fromarray(rgb)
        if self.kind == "jpeg":
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=int(self.value))
            out = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        elif self.kind == "blur":
            out = img.filter(ImageFilter.GaussianBlur(radius=self.value))
        else:
            small = (max(1, round(img.width * self.value)), max(1, round(img.height * self.value)))
            out = img.resize(small, Image.BICUBIC).resize(img.size, Image.BICUBIC)
        return np.asarray(out, dtype=np.uint8).copy()


def parse_transform(spec: str) -> Transform:
    kind, _, raw = spec.strip().partition(":")
    kind = kind.lower()
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"transform {spec!r}: expected jpeg:Q, blur:SIGMA or resize:F") from None
    if kind == "jpeg" and not 1 <= value <= 100:
        raise ValueError(f"transform {spec!r}: JPEG quality must be in 1..100")
    if kind == "blur" and value <= 0:
        raise ValueError(f"transform {spec!r}: blur sigma must be > 0")
    if kind == "resize" and not 0 < value < 1:
        raise ValueError(f"transform {spec!r}: resize factor must be in (0, 1)")
    if kind not in ("jpeg", "blur", "resize"):
        raise ValueError(f"transform {spec!r}: unknown kind {kind!r} (jpeg, blur, resize)")
    return Transform(kind, value)
