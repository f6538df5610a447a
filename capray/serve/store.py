"""The durable job store: every job's request, status and result PNGs under one fsspec URI.

Any ingress replica can answer any job, and a job outlives the replica, the node and the Ray
cluster that accepted it (a RayService upgrade starts a new cluster on the same store). Layout:

    STORE/jobs/<id>/job.json           the request: owner, identity, photo names, effective config
    STORE/jobs/<id>/input/<i>          the uploaded photo files, as sent (deleted when the job ends)
    STORE/jobs/<id>/status.json        pending|ok|failed, progress, attempts, error: the runner's lease
    STORE/jobs/<id>/result.json        the JobResult without pixel data
    STORE/jobs/<id>/photos/<i>.<fmt>   the protected photos (png or webp)
    STORE/pending/<id>.<owner>         one marker per unfinished job (capacity, per-key limits, sweeps)
    STORE/finished/<t>-<id>            one marker per finished job, t = finish time (expiry sweep)

The two marker folders keep every sweep proportional to the jobs in flight or within their TTL,
never to the whole history. Writes are whole-object (atomic on S3, temp+rename locally). The status
is the lease of the runner holding the job (`capray.io.lease`): created with `If-None-Match`, every
later write conditional on the version its runner last wrote, its age judged by the store's clock.
"""

from __future__ import annotations

import os
import time
from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

from capray.io import lease
from capray.io.storage import get_fs, join, write_bytes_atomic
from capray.serve.schemas import JobStatusWord


class JobRequest(BaseModel):
    """What is needed to run (or rerun) a job: same request → same pixels."""

    job_id: str
    owner: str
    identity: str
    names: list[str | None]
    fixed_count: int = Field(0, description="published photos held fixed, stored after the photos in input/")
    config: dict[str, Any] = Field(description="the engine settings the job was accepted with (config.ENGINE_SECTIONS "
                                   "of its effective config): never the server's storage options or keys")
    created_at: float


class JobState(BaseModel):
    """A job's status: also the lease of the runner that holds it (`capray.io.lease`; the lease's own
    `who`/`ttl_s`/`renewals` fields are in the stored object too, and ignored here)."""

    job_id: str
    owner: str
    status: JobStatusWord = "pending"
    created_at: float
    updated_at: float
    finished_at: float | None = None
    error: str | None = None
    steps_done: int = 0
    steps_total: int = 0
    holder: str | None = Field(None, description="the runner holding the job; None while nobody does")
    generation: int = Field(0, description="the lease's fencing generation: bumped by every take-over")
    attempts: int = 0

    @field_validator("status", mode="before")
    @classmethod
    def _old_word(cls, value: Any) -> Any:
        """A store written before the statuses matched the manifest's says `done` for `ok`: still readable."""
        return "ok" if value == "done" else value

    @model_validator(mode="before")
    @classmethod
    def _old_runner(cls, data: Any) -> Any:
        """A store written before job claims were leases names the holder `runner`."""
        if isinstance(data, dict) and "holder" not in data and "runner" in data:
            data = {**data, "holder": data["runner"]}
        return data

    def lease_fields(self) -> dict[str, Any]:
        """What goes into the lease's body beside the lease's own fields (holder, generation)."""
        return self.model_dump(mode="json", exclude={"holder", "generation"})


def default_store() -> str:
    """A local folder under capray's cache: fine on one machine; a cluster sets serve.store to s3://…."""
    from capray.models.cache import cache_root

    return str(cache_root() / "serve-jobs")


class JobStore:
    def __init__(self, uri: str | None, options: dict[str, Any] | None = None, clock=time.time):
        self.uri = uri or default_store()
        self.fs, self.root = get_fs(self.uri, options)
        self.clock = clock

    # -- paths ----------------------------------------------------------------------------------
    def _job(self, job_id: str, *parts: str) -> str:
        return join(self.root, "jobs", job_id, *parts)

    def _pending(self, job_id: str, owner: str | None) -> str:
        """The job's pending marker: its owner in the name, so one listing counts every key's jobs
        (`None`: the owner-less name older versions wrote)."""
        return join(self.root, "pending", job_id if owner is None else f"{job_id}.{owner}")

    # -- small helpers --------------------------------------------------------------------------
    def _read(self, path: str) -> bytes | None:
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def _list(self, folder: str) -> list[str]:
        path = join(self.root, folder)
        self.fs.invalidate_cache(path)  # s3fs caches listings; other replicas change them
        try:
            return sorted(os.path.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False))
        except FileNotFoundError:
            return []

    def _remove(self, path: str, recursive: bool = False) -> None:
        try:
            self.fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass

    # -- jobs -----------------------------------------------------------------------------------
    def create(self, request: JobRequest, files: list[bytes], state: JobState, ttl_s: float,
               **lease_options: Any) -> lease.Lease:
        """The pending marker first (a crash from here on leaves something the sweep finds), then the input
        files and the request, the status last: it is created as the lease of `state.holder`, generation 1.
        The lease is not renewing yet: `start()` it."""
        write_bytes_atomic(self.fs, self._pending(request.job_id, request.owner), b"")
        for i, data in enumerate(files):
            write_bytes_atomic(self.fs, self._job(request.job_id, "input", str(i)), data)
        write_bytes_atomic(self.fs, self._job(request.job_id, "job.json"), request.model_dump_json().encode())
        held = lease.create(self._status(request.job_id), ttl_s, uri=self._job(request.job_id, "status.json"),
                            holder=state.holder, extra=state.lease_fields(), **lease_options)
        if held is None:
            raise RuntimeError(f"job {request.job_id} already exists")
        return held

    def _status(self, job_id: str) -> lease.Backend:
        return lease.backend_on(self.fs, self._job(job_id, "status.json"))

    def peek(self, job_id: str) -> lease.Seen | None:
        """The job's status as its lease: body, version, and age by the store's clock (None: no status)."""
        return self._status(job_id).read()

    def take_over(self, seen: lease.Seen, state: JobState, ttl_s: float, **lease_options: Any) -> lease.Lease | None:
        """Hold the job whose status was `seen`, for `state.holder` (the next generation); None when
        another replica changed it since (it adopted the job first, or the job finished)."""
        return lease.take_over(self._status(state.job_id), seen, ttl_s, uri=self._job(state.job_id, "status.json"),
                               holder=state.holder, extra=state.lease_fields(), **lease_options)

    def request(self, job_id: str) -> JobRequest | None:
        raw = self._read(self._job(job_id, "job.json"))
        return JobRequest.model_validate_json(raw) if raw is not None else None

    def inputs(self, job_id: str, count: int) -> list[bytes]:
        return [self.fs.cat_file(self._job(job_id, "input", str(i))) for i in range(count)]

    def state(self, job_id: str) -> JobState | None:
        if not job_id.isalnum():
            return None
        raw = self._read(self._job(job_id, "status.json"))
        return JobState.model_validate_json(raw) if raw is not None else None

    def finish(self, held: lease.Lease, state: JobState, photos: list[tuple[bytes, str]], summary: bytes) -> bool:
        """Results before the status that points at them, and only while `held` (checked first, then the
        status written on the lease's condition); False when the job is no longer this holder's."""
        try:
            held.check()
        except lease.LeaseLost:
            return False
        for i, (data, fmt) in enumerate(photos):  # (file bytes, format) per photo
            write_bytes_atomic(self.fs, self._job(state.job_id, "photos", f"{i}.{fmt}"), data)
        write_bytes_atomic(self.fs, self._job(state.job_id, "result.json"), summary)
        return self._close(held, state, "ok", None)

    def fail(self, held: lease.Lease, state: JobState, error: str) -> bool:
        return self._close(held, state, "failed", error)

    def _close(self, held: lease.Lease, state: JobState, status: str, error: str | None) -> bool:
        state.status, state.error, state.finished_at = status, error, self.clock()
        state.updated_at = state.finished_at
        if not held.finish({**held.body, **state.lease_fields()}):
            return False
        self.settle(state)
        return True

    def settle(self, state: JobState) -> None:
        """After a job's final status: its finished marker, its pending marker gone, its uploads deleted
        (users' photos are kept no longer than needed). Idempotent: the sweep repeats it for a replica
        that died half-way through."""
        write_bytes_atomic(self.fs, join(self.root, "finished", f"{int(state.finished_at or 0)}-{state.job_id}"), b"")
        self._remove(self._job(state.job_id, "input"), recursive=True)
        self._drop_markers(state.job_id, state.owner)

    def _drop_markers(self, job_id: str, owner: str | None) -> None:
        """The job's pending marker under `owner`, and under the owner-less name older versions wrote."""
        for name in {owner, None}:
            self._remove(self._pending(job_id, name))

    def marker_age(self, job_id: str, owner: str | None) -> float | None:
        """Seconds since the job's pending marker was written, by the store's clock (None: no marker)."""
        seen = lease.backend_on(self.fs, self._pending(job_id, owner)).read()
        return None if seen is None else seen.age_s

    def result(self, job_id: str) -> bytes | None:
        return self._read(self._job(job_id, "result.json"))

    def photo(self, job_id: str, index: int, fmt: str = "png") -> bytes | None:
        return self._read(self._job(job_id, "photos", f"{index}.{fmt}"))

    def delete(self, job_id: str, owner: str | None) -> None:
        """The job's folder and its pending marker (`owner`'s, and the owner-less name older versions wrote;
        None for a finished job, whose marker is gone)."""
        self._remove(self._job(job_id), recursive=True)
        self._drop_markers(job_id, owner)

    # -- sweeps ---------------------------------------------------------------------------------
    def pending(self) -> list[tuple[str, str | None]]:
        """(job id, owner) of every unfinished job: one listing."""
        return [(job_id, owner or None) for job_id, _, owner in (name.partition(".") for name in self._list("pending"))]

    def expired(self, ttl_s: float) -> list[tuple[str, str]]:
        """(marker, job id) of finished jobs older than the TTL, oldest first."""
        cutoff = self.clock() - ttl_s
        out = []
        for name in self._list("finished"):
            stamp, _, job_id = name.partition("-")
            if stamp.isdigit() and int(stamp) < cutoff:
                out.append((name, job_id))
        return out

    def expire(self, marker: str, job_id: str) -> None:
        self.delete(job_id, None)
        self._remove(join(self.root, "finished", marker))
