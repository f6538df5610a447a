"""HTTP request and response bodies of the protection API (pydantic, so FastAPI validates and documents them)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

from capray.attack.api import ProtectionRecord

# One word per state, as in the batch manifest (ok | failed): a finished job is `ok`, never `done`.
JobStatusWord = Literal["pending", "ok", "failed"]


class PhotoIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str = Field(..., description="the photo file (PNG, JPEG, WebP…) base64-encoded; "
                                       "a data: URL prefix is allowed")
    name: str | None = Field(None, max_length=200, description="echoed back, e.g. the file name")


class ProtectOptions(BaseModel):
    """Everything of a request but the photos (the `options` part of a multipart upload)."""

    model_config = ConfigDict(extra="forbid")

    identity: str = Field("user", min_length=1, max_length=256,
                          description="seeds the randomness: same photos + identity + config → same pixels")
    config: dict[str, Any] = Field(default_factory=dict,
                                   description="overrides of the server's `seed`, `attack`, `cap` and `output` "
                                   "settings")
    fixed_jobs: list[Annotated[str, StringConstraints(max_length=64)]] = Field(
        default_factory=list, max_length=16, description="finished jobs of yours whose protected photos are this "
        "person's published ones: they are held fixed in CAP's group and only the new photos are protected "
        "(append). Uploaded `fixed` photos add to them")


class ProtectRequest(ProtectOptions):
    """Photos of ONE person: CAP protects them as a group (the cross-image loss needs ≥ 2)."""

    photos: list[PhotoIn] = Field(..., description="1 to serve.max_photos photos")
    fixed: list[PhotoIn] = Field(default_factory=list, description="this person's already-published protected "
                                 "photos, held fixed (append): in CAP's group, never changed, not returned; they "
                                 "count toward serve.max_photos and the pixel budget")


class PhotoOut(BaseModel):
    name: str | None
    format: Literal["png", "webp"] = Field("png", description="the protected photo's file format (the request's "
                                            "`output.format`; lossless either way)")
    png: str | None = Field(None, description="protected photo, base64, in `format` (lossless; same size as the "
                            "input; the input's colour profile); in the sync response only")
    url: str | None = Field(None, description="where to GET this protected photo (jobs only)")
    width: int
    height: int
    linf_255: float
    psnr: float | None
    ssim: float
    notes: list[str] = Field(default_factory=list)


class JobResult(ProtectionRecord):
    """The engine's `ProtectionRecord` for the group, plus the protected photos themselves."""

    photos: list[PhotoOut]
    eps: float = Field(..., description="L∞ budget in [-1, 1] units")
    eps_255: float = Field(..., description="the same budget in 0..255 units")


def utc(timestamp: float | None) -> datetime | None:
    """A stored epoch time as the API shows it: ISO 8601 in UTC (`2026-12-08T10:11:12.345678Z`), as in the manifest."""
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC)


class JobAccepted(BaseModel):
    job_id: str
    status: JobStatusWord = Field(description="pending for a new job; a replayed Idempotency-Key gives the job's "
                                  "current status")
    status_url: str = Field(description="the job's URL (also in the Location header)")


class Progress(BaseModel):
    steps_done: int = Field(description="PGD steps finished")
    steps_total: int


class JobFields(BaseModel):
    """What every view of a job shows: its status in the list and on its own."""

    job_id: str
    status: JobStatusWord
    created_at: AwareDatetime
    finished_at: AwareDatetime | None = None
    progress: Progress


class JobSummary(JobFields):
    """A job in the caller's list."""

    photos: int = Field(description="photos the job protects")
    status_url: str


class JobList(BaseModel):
    jobs: list[JobSummary] = Field(description="the caller's jobs, newest first")
    next_cursor: str | None = Field(None, description="pass as `cursor` for the next page; null on the last page")


class JobStatus(JobFields):
    attempts: int = Field(description="runs started (a rerun follows a runner lost to a restart)")
    error: str | None = None
    result_zip_url: str | None = None
    result: JobResult | None = Field(None, description="when ok; photos carry their download `url`")
