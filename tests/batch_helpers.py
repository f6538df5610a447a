"""What the bulk-job tests share: a fast config for stand-in engines, and small photos to protect."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from capray.config import load_config


def config(**batch):
    """The smoke preset on the tiny model, small commits, no group retries, plus `batch` overrides."""
    return load_config(preset="smoke", overrides={"model": {"sd": "tiny"}, "batch": {
        "cpus_per_actor": 0.25, "records_per_commit": 2, "group_retries": 0, **batch}})


def save(path: Path, seed: int, size: int = 24) -> None:
    """A random RGB photo at `path` (its folder created), the same for the same seed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
