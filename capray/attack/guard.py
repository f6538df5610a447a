"""The non-finite guard: a NaN or Inf anywhere in a PGD step fails the group, never `ok`.

Why it is needed: a NaN score loses every `>` comparison, so λ silently becomes 0; a NaN gradient
has a NaN sign and turns the photo into NaN (or, clipped, into garbage), and the group would still
be reported protected. In fp16/bf16 one overflow is enough. Each check is one reduction per tensor
on the device and one host sync per step (the step syncs for its loss values anyway).

`NonFiniteError.failure_class` is "transient" whatever the dtype: the same config and seed give the
same NaN, so the job does not retry it within a run, but the next run does (after the operator
changed what caused it, e.g. `model.dtype: fp32`), and quarantine ends an endless cycle. An "input"
class would skip the identity until its photos change, which a model or dtype fix would never undo.
"""

from __future__ import annotations

import math
from typing import Any

import torch

HALF_PRECISION = (torch.float16, torch.bfloat16)


class NonFiniteError(RuntimeError):
    """A PGD step (or a surrogate training step) met NaN/Inf; the group is not protected."""

    failure_class = "transient"

    def __init__(self, what: str, step: int | None, dtype: torch.dtype):
        self.what, self.step, self.dtype = what, step, dtype
        where = f"PGD step {step}" if step is not None else "surrogate training"
        if dtype in HALF_PRECISION:
            advice = (f"the model runs in {str(dtype).removeprefix('torch.')}, where one overflow is enough; "
                      "a rerun with model.dtype: fp32 may fix it")
        else:
            advice = "in full precision this points at the model's weights (or a bug): check them and rerun"
        super().__init__(f"non-finite values (NaN/Inf) in {what} at {where}; the group is not protected: {advice}")


def check(step: int | None, dtype: torch.dtype, checks: list[tuple[str, Any]]) -> None:
    """Raise `NonFiniteError` naming the first of `checks` that holds a NaN or Inf.

    `checks`: (what, value) in the order things were computed, so the error names where the first NaN
    appeared; a value is a tensor, a float, a list of floats or None (skipped). Tensors are reduced on
    their device and read back together: one host sync for the whole step.
    """
    tensors = [v for _, v in checks if isinstance(v, torch.Tensor) and v.numel()]
    flags = iter(torch.stack([torch.isfinite(t).all() for t in tensors]).tolist() if tensors else [])
    for what, value in checks:
        if isinstance(value, torch.Tensor):
            finite = next(flags) if value.numel() else True
        elif value is None:
            finite = True
        elif isinstance(value, (int, float)):
            finite = math.isfinite(value)
        else:
            finite = all(math.isfinite(v) for v in value)
        if not finite:
            raise NonFiniteError(what, step, dtype)
