"""How the report writes one value: numbers, metric arrows and headers (shared by its tables)."""

from __future__ import annotations

import html
import math

from capray.evaluate.metrics import DIRECTION


def fmt(v: float | None, spec: str = "{:.4f}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    return spec.format(v)


def arrow(metric: str) -> str:
    """Which way is stronger protection."""
    return "↑" if DIRECTION[metric] > 0 else "↓"


def short_backend(name: str) -> str:
    return "unavailable" if name.startswith("unavailable") else name


def metric_header(metric: str, backend: str) -> str:
    return f"{metric} {arrow(metric)}<small>{html.escape(short_backend(backend))}</small>"
