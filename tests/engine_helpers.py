"""What the engine tests share: small fp64 groups of mixed photo sizes, method settings, the faces."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

RES = 32  # the smallest model resolution: keeps the per-r reference search cheap


def mixed_group(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(3, 48, 48, generator=gen, dtype=torch.float64)
    sizes = [(40, 56), (48, 36), (32, 32)]
    return [((torch.nn.functional.interpolate(base[None], size=s, mode="bilinear")[0]
              + 0.3 * torch.rand(3, *s, generator=gen, dtype=torch.float64)).clamp(0, 1) * 2 - 1) for s in sizes]


METHOD_STEPS = {
    "fsmg": {"method": "fsmg", "pgd_steps": 2, "fsmg_train_steps": 1},
    "aspl": {"method": "aspl", "outer_loops": 1, "adv_steps": 2, "surrogate_steps": 1},
    "simac": {"method": "simac", "outer_loops": 1, "adv_steps": 2, "surrogate_steps": 1},
}


def assert_same(a, b):
    assert a.lambda_schedule == b.lambda_schedule
    assert all(r is not None for r in a.lambda_schedule)
    assert all(torch.equal(x, y) for x, y in zip(a.images, b.images))


def load_faces(folder, size: int) -> list[torch.Tensor]:
    files = sorted(folder.glob("set_B/*.png"))
    return [torch.from_numpy(np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC)))
            .permute(2, 0, 1).float() / 127.5 - 1 for f in files]
