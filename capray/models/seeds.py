"""Seeds derived from names: (run seed, identity, purpose, step) → the same generator everywhere.

Below the engine so that the models' own sampling (class images) seeds the same way without importing
it; `capray.attack.randomness` builds its noise draws on these.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: object) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def cpu_generator(*parts: object) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(derive_seed(*parts))
