"""What every purification is: a named, parameterised, deterministic uint8-RGB → uint8-RGB map of the same size.

A purification is what an attacker runs on protected photos before fine-tuning. Its spec string
(`jpeg:75`) names it in the config and on the command line; `label` names it in the report, `slug` in
file names, and `parameters` says exactly what ran. Pixel filters run as they are; a purification that
needs model weights says why it cannot run (`unavailable`) instead of being approximated.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np


class Unavailable(Exception):
    """This purification cannot run here (its model is not configured or did not load); the message says
    how to supply it. The photo set it would have produced is reported as unavailable, never trained on."""


@dataclass(frozen=True)
class Transform:
    """One purification. Subclasses set the ClassVars and implement `label`, `parameters` and `apply`."""

    value: float
    kind: ClassVar[str] = ""
    form: ClassVar[str] = ""  # the spelling, e.g. "jpeg:Q"
    rule: ClassVar[str] = ""  # what the value may be, e.g. "Q an integer in 1..100"
    integer: ClassVar[bool] = False

    def __post_init__(self) -> None:
        problem = self.problem(self.value)
        if problem:
            raise ValueError(f"transform {self.kind}:{self.value:g}: {problem}")

    @classmethod
    def problem(cls, value: float) -> str | None:
        """What is wrong with `value` for this kind (None: nothing)."""
        if not math.isfinite(value) or (cls.integer and value != int(value)) or not cls.valid(value):
            return f"expected {cls.form} with {cls.rule}"
        return None

    @classmethod
    def valid(cls, value: float) -> bool:
        raise NotImplementedError

    @property
    def spec(self) -> str:
        """The canonical spec string (`JPEG:75.0` and `jpeg:75` are one purification)."""
        return f"{self.kind}:{int(self.value) if self.integer else format(self.value, 'g')}"

    @property
    def slug(self) -> str:
        return self.spec.replace(":", "")

    @property
    def label(self) -> str:
        raise NotImplementedError

    @property
    def parameters(self) -> dict[str, Any]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The purification as results.json and the report show it."""
        return {"spec": self.spec, "label": self.label, "slug": self.slug, "parameters": self.parameters}

    def unavailable(self, ev: Any) -> str | None:
        """Why this cannot run under `ev` (an EvaluateConfig), or None: pixel filters always run."""
        return None

    def load(self, cfg: Any, device: Any, dtype: Any) -> Any:
        """What runs this purification on `device`: a pixel filter is its own runner."""
        return self

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        check_rgb(rgb, self.spec)
        return check_output(self.apply(rgb), rgb, self.spec)

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def check_rgb(rgb: Any, spec: str) -> None:
    """Purifications read what an attacker downloads: 8-bit RGB, height × width × 3."""
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        got = f"shape {getattr(rgb, 'shape', None)} dtype {getattr(rgb, 'dtype', type(rgb).__name__)}"
        raise ValueError(f"transform {spec!r} needs an HxWx3 uint8 RGB array, got {got}")


def check_output(out: np.ndarray, rgb: np.ndarray, spec: str) -> np.ndarray:
    """A purification keeps the photo's size and 8 bits (the attacker's pipeline expects nothing else)."""
    if out.shape != rgb.shape or out.dtype != np.uint8:
        raise RuntimeError(f"transform {spec!r} returned {out.shape} {out.dtype} for a {rgb.shape} uint8 photo")
    return out


def photo_seed(rgb: np.ndarray, *parts: object) -> int:
    """A seed from the photo's pixels and `parts` (spec, run seed): every photo gets its own, reproducible
    draw, whatever order the photos come in."""
    digest = hashlib.sha256(":".join(map(str, (*parts, rgb.shape))).encode())
    digest.update(np.ascontiguousarray(rgb).tobytes())
    return int.from_bytes(digest.digest()[:8], "little") & ((1 << 63) - 1)
