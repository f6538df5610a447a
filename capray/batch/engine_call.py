"""uint8 photos in, protected uint8 photos and a manifest record out — around the ONE engine call.

Both the batch actor and an online endpoint call `protect_arrays`, so a group protected through
either door with the same config and seed gives the same pixels.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from capray import __version__
from capray.config import CaprayConfig


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if not math.isnan(value) else None


def protect_arrays(rgbs: list[np.ndarray], cfg: CaprayConfig, identity: str, models: Any
                   ) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Protect one identity's (H, W, 3) uint8 photos; returns protected uint8 photos and a record."""
    from capray import protect_group
    from capray.attack.metrics import from_uint8, to_uint8

    result = protect_group([from_uint8(a) for a in rgbs], cfg, identity=identity, models=models)
    protected = [to_uint8(t) for t in result.images]
    linf = [m["linf_255"] for m in result.metrics]
    record = {
        "method": result.method,
        "cap_enabled": bool(result.cap_enabled),
        "lambda_schedule": [_finite_or_none(r) for r in result.lambda_schedule],
        "loss_trajectory": [float(v) for v in result.loss_trajectory],
        "distinct_candidates": [int(v) for v in result.distinct_counts],
        "pgd_steps": len(result.steps),
        "linf_255": linf,
        "linf_255_max": max(linf) if linf else None,
        "psnr": [m["psnr"] for m in result.metrics],
        "ssim": [m["ssim"] for m in result.metrics],
        "consistency_before": float(result.consistency_before),
        "consistency_after": float(result.consistency_after),
        "surrogate_mode": result.surrogate_mode,
        "notes": [*cfg.model.notes, *result.notes],  # the tiny model labels every output (manifest, Serve)
        "engine_seconds": float(result.timings.get("total_s", 0.0)),
        "model_id": cfg.model.sd,  # what the user asked for ('tiny', a hub id or a directory)
        "config_hash": cfg.config_hash(),
        "seed": cfg.seed,
        "capray_version": __version__,
    }
    return protected, record
