"""Purification spec strings (config `evaluate.transforms`, CLI `--transform`) → transforms.

A spec is `KIND:VALUE`: `jpeg:Q`, `blur:SIGMA`, `resize:F`, `median:K`, `bilateral:SIGMA_COLOR`,
`noise-denoise:SIGMA`, `tvm:W` (pixel filters, `capray.evaluate.filters`), `upscale:NOISE` and
`diffpure:STRENGTH` (need weights, `capray.evaluate.purifiers`), or `suite`: the standard set below.
docs/evaluation.md#purifications has the table.
"""

from __future__ import annotations

from capray.evaluate.filters import FILTERS
from capray.evaluate.purification import Transform, Unavailable
from capray.evaluate.purifiers import MODELS

__all__ = ["KINDS", "SUITE", "Transform", "Unavailable", "parse_transform", "parse_transforms"]

KINDS: dict[str, type[Transform]] = {cls.kind: cls for cls in (*FILTERS, *MODELS)}
# The standard suite: a platform's re-encodes, the classic filters, and the two model purifiers.
SUITE = ("jpeg:95", "jpeg:75", "jpeg:50", "blur:1", "median:3", "bilateral:25", "resize:0.5",
         "noise-denoise:8", "tvm:0.1", "upscale:20", "diffpure:0.1")


def allowed_forms() -> str:
    return ", ".join(cls.form for cls in KINDS.values()) + " or suite"


def parse_transform(spec: str) -> Transform:
    """One spec (not `suite`) → its transform; a ValueError names the spec and the allowed form."""
    kind, sep, raw = str(spec).strip().partition(":")
    if kind.strip().lower() == "suite":
        raise ValueError(f"transform {spec!r}: 'suite' stands alone (it expands to {', '.join(SUITE)})")
    cls = KINDS.get(kind.strip().lower())
    if cls is None:
        raise ValueError(f"transform {spec!r}: unknown kind {kind.strip()!r}; expected {allowed_forms()}")
    try:
        value = float(raw) if sep else None
    except ValueError:
        value = None
    problem = cls.problem(value) if value is not None else f"expected {cls.form} with {cls.rule}"
    if problem:
        raise ValueError(f"transform {spec!r}: {problem}")
    return cls(value)


def parse_transforms(specs: list[str]) -> list[Transform]:
    """Specs in order, `suite` expanded in place; a purification named twice runs once."""
    out: dict[Transform, None] = {}
    for spec in specs:
        names = SUITE if str(spec).strip().lower() == "suite" else (spec,)
        out.update(dict.fromkeys(parse_transform(name) for name in names))
    return list(out)
