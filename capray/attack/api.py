"""THE engine call every front door makes: uint8 photos in, protected uint8 photos and a record out.

The batch actors, Serve's `Protector` and the benchmarks all call `protect_arrays`, so a group
protected through any door with the same config, seed and identity gets the same pixels. The
`ProtectionRecord` it returns is the one definition of what a protection run reports: the batch
manifest's columns and Serve's response both extend it rather than spelling its fields again.
"""

from __future__ import annotations

import math
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from capray import __version__


class RunInfo(BaseModel):
    """What identifies the run that protected a group; known from the config alone, so failed rows have it too."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field(description="baseline attack: fsmg, aspl or simac")
    config_hash: str = Field(description="hash of every setting that decides output pixels")
    model_id: str = Field(description="model.sd as configured: 'tiny', a hub id or a directory")
    seed: int
    capray_version: str = __version__

    @classmethod
    def of(cls, cfg: Any) -> RunInfo:
        return cls(method=cfg.attack.method, config_hash=cfg.config_hash(), model_id=cfg.model.sd, seed=cfg.seed)

    def run_fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in RunInfo.model_fields}


class ProtectionRecord(RunInfo):
    """What the engine reports for one protected group.

    The engine's own outcome fields are optional only so that rows of groups the engine never saw
    (a failed decode) can share this model (`unprotected`); `protect_arrays` always fills them.
    """

    identity: str = Field(description="the group's identity, as named in the input (not the folder name)")
    cap_enabled: bool | None = Field(None, description="CAP ran (False for one-photo groups or cap.enabled=false)")
    lambda_schedule: list[float | None] | None = Field(None, description="λ per PGD step (null before k̂)")
    loss_trajectory: list[float] | None = Field(None, description="L_re per PGD step")
    distinct_candidates: list[int] | None = Field(None, description="distinct λ candidates per searched step")
    lambda_collapsed: bool | None = Field(None, description="λ stopped choosing: most searched steps had ≤ 2 "
                                          "distinct candidates (null when no step searched λ)")
    pgd_steps: int | None = None
    linf_255: list[float] | None = Field(None, description="per photo L∞ of the perturbation, 0..255 units")
    linf_255_max: float | None = None
    psnr: list[float | None] | None = Field(None, description="per photo, dB (null where the photo is unchanged)")
    ssim: list[float] | None = None
    consistency_before: float | None = None
    consistency_after: float | None = None
    surrogate_mode: str | None = Field(None, description="how the surrogate's weights were kept, e.g. fp32-master")
    fixed_members: int | None = Field(None, description="already-published photos held fixed in CAP's style mean "
                                      "(append mode); the per-photo fields cover the newly protected photos only")
    notes: list[str] = Field(default_factory=list)
    engine_seconds: float | None = Field(None, description="wall time of the engine call for this group "
                                         "(protect_arrays: attack, conversions and quality metrics)")

    @classmethod
    def unprotected(cls, cfg: Any, identity: str) -> ProtectionRecord:
        """The record of a group the engine never ran on: the run's fields and the model's notes only."""
        return cls(**RunInfo.of(cfg).run_fields(), identity=identity, notes=list(cfg.model.notes))


def _finite_or_none(value: Any) -> float | None:
    """NaN/inf cannot travel in JSON or mean anything in a table: they become null."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def protect_arrays(rgbs: list[Any], cfg: Any, identity: str, models: Any,
                   progress: Any = None, evaluator_factory: Any = None,
                   fixed: list[Any] | None = None) -> tuple[list[Any], ProtectionRecord]:
    """Protect one identity's (H, W, 3) uint8 photos; returns protected uint8 photos and the record.

    `progress(done, total)`, if given, is called after every PGD step. `evaluator_factory`: where λ
    candidates are scored (None: in this process; `capray.distributed` shards them over actors).
    `fixed`: the identity's already-published protected photos, (H, W, 3) uint8: members of CAP's
    group that are never changed (append mode); only `rgbs` are protected and returned.
    """
    from capray.attack.engine import protect_group
    from capray.attack.metrics import from_uint8, to_uint8

    start = time.perf_counter()
    result = protect_group([from_uint8(a) for a in rgbs], cfg, identity=identity, models=models, progress=progress,
                           evaluator_factory=evaluator_factory,
                           fixed=[from_uint8(a) for a in fixed] if fixed else None)
    protected = [to_uint8(t) for t in result.images]
    linf = [m["linf_255"] for m in result.metrics]
    record = ProtectionRecord(
        **RunInfo.of(cfg).run_fields(),
        identity=identity,
        cap_enabled=bool(result.cap_enabled),
        lambda_schedule=[_finite_or_none(r) for r in result.lambda_schedule],
        loss_trajectory=[float(v) for v in result.loss_trajectory],
        distinct_candidates=[int(v) for v in result.distinct_counts],
        lambda_collapsed=result.lambda_collapsed,
        pgd_steps=len(result.steps),
        linf_255=linf,
        linf_255_max=max(linf) if linf else None,
        psnr=[_finite_or_none(m["psnr"]) for m in result.metrics],
        ssim=[m["ssim"] for m in result.metrics],
        consistency_before=float(result.consistency_before),
        consistency_after=float(result.consistency_after),
        surrogate_mode=result.surrogate_mode,
        fixed_members=result.fixed_members,
        notes=[*cfg.model.notes, *result.notes],  # the tiny model labels every output (manifest, Serve)
        engine_seconds=time.perf_counter() - start,  # what a direct caller of this function would time
    )
    return protected, record
