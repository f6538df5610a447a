"""HTTP request and response bodies of the protection API (pydantic, so FastAPI validates and documents them)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from capray.attack.api import ProtectionRecord


class PhotoIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str = Field(..., description="the photo file (PNG, JPEG, WebP…) base64-encoded; a data: URL prefix is allowed")
    name: str | None = Field(None, max_length=200, description="echoed back, e.g. the file name")


class ProtectRequest(BaseModel):
    """Photos of ONE person: CAP protects them as a group (the cross-image loss needs ≥ 2)."""

    model_config = ConfigDict(extra="forbid")

    photos: list[PhotoIn] = Field(..., min_length=1)
    identity: str = Field("user", min_length=1, max_length=256,
                          description="seeds the randomness: same photos + identity + config → same pixels")
    config: dict[str, Any] = Field(default_factory=dict,
                                   description="overrides of the server's `seed`, `attack` and `cap` settings")


class PhotoOut(BaseModel):
    name: str | None
    png: str = Field(..., description="protected photo, base64 PNG (lossless; same size as the input)")
    width: int
    height: int
    linf_255: float
    psnr: float | None
    ssim: float
    notes: list[str] = Field(default_factory=list)


class ProtectResult(ProtectionRecord):
    """The engine's `ProtectionRecord` for the group, plus the protected photos themselves."""

    identity: str
    photos: list[PhotoOut]
    eps: float = Field(..., description="L∞ budget in [-1, 1] units")
    eps_255: float = Field(..., description="the same budget in 0..255 units")


class JobAccepted(BaseModel):
    job_id: str
    status: Literal["pending"]
    status_url: str


class JobStatus(BaseModel):
    job_id: str
    status: Literal["pending", "done", "failed"]
    created_at: float
    finished_at: float | None = None
    error: str | None = None
    result: ProtectResult | None = None
