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
    STORE/owners/<owner>/<n>-<id>      one marker per job of an owner, n = inverted creation time in µs
                                       (the owner's job list, newest first in name order)
    STORE/idempotency/<owner>/<key>    a submit's Idempotency-Key (its digest): the job it created and
                                       the digest of the request, so a retry finds the job again

The marker folders keep every sweep and listing proportional to the jobs in flight or within their
TTL, never to the whole history. Deleting a job (`delete`: on request, or past its TTL) removes its
status first — its runner's next renewal fails and it stops — then its markers, records and files.
Writes are whole-object (atomic on S3, temp+rename locally). The status is the lease of the runner
holding the job (`capray.io.lease`): created with `If-None-Match`, every later write conditional on
the version its runner last wrote, its age judged by the store's clock.
"""

from __future__ import annotations

import hashlib
import os
import re
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
    idempotency_key: str | None = Field(None, description="digest of the submit's Idempotency-Key (its record "
                                        "is deleted with the job)")
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
    photos: int = Field(0, description="photos protected (returned) by the job")
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


OWNER_MARKER = re.compile(r"\d{16}-[0-9a-f]{32}")  # what `_owner_marker` names; a list cursor is one
NEVER = 10**16  # µs: owner markers count down from here, so name order is newest first


def key_digest(idempotency_key: str) -> str:
    """The stored name of an Idempotency-Key: never the key itself (a client may put anything in it)."""
    return hashlib.sha256(b"capray-idempotency:" + idempotency_key.encode()).hexdigest()[:32]


class Idempotent(BaseModel):
    """An Idempotency-Key's record: the job its first submit created, and that request's digest."""

    job_id: str
    request_digest: str
    created_at: float


class JobStore:
    def __init__(self, uri: str | None, options: dict[str, Any] | None = None, clock=time.time):
        self.uri = uri or default_store()
        self.fs, self.root = get_fs(self.uri, options)
        self.clock = clock

    # -- paths ----------------------------------------------------------------------------------
    def _job(self, job_id: str, *parts: str) -> str:
        return join(self.root, "jobs", job_id, *parts)

    def _owner_marker(self, owner: str, job_id: str, created_at: float) -> str:
        return join(self.root, "owners", owner, f"{NEVER - int(created_at * 1e6):016d}-{job_id}")

    def _finished(self, state: JobState) -> str:
        return join(self.root, "finished", f"{int(state.finished_at or 0)}-{state.job_id}")

    def _idempotency(self, owner: str, digest: str) -> str:
        return join(self.root, "idempotency", owner, digest)

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
        files, the request and the owner's marker (which `delete` finds from the request), the status last:
        it is created as the lease of `state.holder`, generation 1. The lease is not renewing yet: `start()` it."""
        write_bytes_atomic(self.fs, self._pending(request.job_id, request.owner), b"")
        for i, data in enumerate(files):
            write_bytes_atomic(self.fs, self._job(request.job_id, "input", str(i)), data)
        write_bytes_atomic(self.fs, self._job(request.job_id, "job.json"), request.model_dump_json().encode())
        write_bytes_atomic(self.fs, self._owner_marker(request.owner, request.job_id, request.created_at), b"")
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
        if self._close(held, state, "ok", None):
            return True
        if self.peek(state.job_id) is None:  # deleted while its results were written: they go too
            self._remove(self._job(state.job_id), recursive=True)
        return False

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
        write_bytes_atomic(self.fs, self._finished(state), b"")
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
        """Everything of the job, now: its status first (a runner holding it loses its lease at the next
        renewal and stops), then its owner's marker and Idempotency-Key record (named in its request), its
        finished marker, its folder (uploads, results, request) and its pending marker (`owner`'s, and the
        owner-less name older versions wrote; None for a finished job, whose marker is gone)."""
        request, state = self.request(job_id), self.state(job_id)
        self._remove(self._job(job_id, "status.json"))
        if state is not None and state.finished_at is not None:
            self._remove(self._finished(state))
        if request is not None:
            self._remove(self._owner_marker(request.owner, job_id, request.created_at))
            if request.idempotency_key:
                self._remove(self._idempotency(request.owner, request.idempotency_key))
        self._remove(self._job(job_id), recursive=True)
        self._drop_markers(job_id, owner)

    # -- an owner's jobs --------------------------------------------------------------------------
    def jobs_of(self, owner: str, limit: int, after: str | None = None) -> tuple[list[JobState], str | None]:
        """A page of `owner`'s jobs, newest first: up to `limit` states after the cursor `after`, and the
        cursor of the next page (None: this is the last). A job being created or deleted (no status) is
        skipped. Per owner the markers are bounded by the jobs within `serve.job_ttl_s`."""
        names = [n for n in self._list(join("owners", owner))
                 if OWNER_MARKER.fullmatch(n) and (after is None or n > after)]
        page: list[JobState] = []
        for i, name in enumerate(names):
            state = self.state(name.partition("-")[2])
            if state is not None and state.owner == owner:
                page.append(state)
            if len(page) == limit:
                return page, (name if i + 1 < len(names) else None)
        return page, None

    # -- idempotency ------------------------------------------------------------------------------
    def reserve(self, owner: str, digest: str, record: Idempotent) -> Idempotent | None:
        """Record `record` for the caller's key `digest` unless one exists (a conditional create: of two
        concurrent first submits exactly one wins); None when recorded, else the existing record."""
        backend = lease.backend_on(self.fs, self._idempotency(owner, digest))
        for _ in range(3):
            if backend.create(record.model_dump_json().encode()) is not None:
                return None
            raw = self._read(self._idempotency(owner, digest))
            if raw is None:
                continue  # removed meanwhile (its job was deleted): try again
            existing = Idempotent.model_validate_json(raw)
            if self.state(existing.job_id) is None and self.request(existing.job_id) is None \
                    and self.clock() - existing.created_at > 60:  # its submit died before storing the job
                self._remove(self._idempotency(owner, digest))
                continue
            return existing
        raise RuntimeError("could not record the Idempotency-Key: it keeps changing")

    def idempotent(self, owner: str, digest: str) -> Idempotent | None:
        raw = self._read(self._idempotency(owner, digest))
        return Idempotent.model_validate_json(raw) if raw is not None else None

    def release(self, owner: str, digest: str) -> None:
        """Forget a reservation whose job was never stored (its submit was refused or failed)."""
        self._remove(self._idempotency(owner, digest))

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
