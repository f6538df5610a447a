"""The durable job store: every job's request, status and result PNGs under one fsspec URI.

Any ingress replica can answer any job, and a job outlives the replica, the node and the Ray
cluster that accepted it (a RayService upgrade starts a new cluster on the same store). Layout:

    STORE/jobs/<id>/job.json           the request: owner, identity, photo names, effective config
    STORE/jobs/<id>/input/<i>          the uploaded photo files, as sent (deleted when the job ends)
    STORE/jobs/<id>/status.json        pending|ok|failed, progress, runner lease, attempts, error
    STORE/jobs/<id>/result.json        the JobResult without pixel data
    STORE/jobs/<id>/photos/<i>.png     the protected photos
    STORE/pending/<id>                 one marker per unfinished job (capacity, orphan sweep)
    STORE/finished/<t>-<id>            one marker per finished job, t = finish time (expiry sweep)

The two marker folders keep every sweep proportional to the jobs in flight or within their TTL,
never to the whole history. Writes are whole-object (atomic on S3, temp+rename locally).
"""

from __future__ import annotations

import os
import time
from typing import Any

from pydantic import BaseModel, Field, field_validator

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
    job_id: str
    owner: str
    status: JobStatusWord = "pending"
    created_at: float
    updated_at: float
    finished_at: float | None = None
    error: str | None = None
    steps_done: int = 0
    steps_total: int = 0
    runner: str | None = None
    lease_until: float = 0.0
    attempts: int = 0

    @field_validator("status", mode="before")
    @classmethod
    def _old_word(cls, value: Any) -> Any:
        """A store written before the statuses matched the manifest's says `done` for `ok`: still readable."""
        return "ok" if value == "done" else value


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

    def _pending(self, job_id: str) -> str:
        return join(self.root, "pending", job_id)

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
    def create(self, request: JobRequest, files: list[bytes], state: JobState) -> None:
        """Input files and the request first, the status and pending marker last: a job is visible only whole."""
        for i, data in enumerate(files):
            write_bytes_atomic(self.fs, self._job(request.job_id, "input", str(i)), data)
        write_bytes_atomic(self.fs, self._job(request.job_id, "job.json"), request.model_dump_json().encode())
        self.put_state(state)
        write_bytes_atomic(self.fs, self._pending(request.job_id), b"")

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

    def held_by(self, job_id: str, runner: str | None) -> bool:
        """Whether the stored job is still pending and held by `runner`: a finished job, or one another
        replica took over, is not this runner's to write."""
        current = self.state(job_id)
        return current is not None and current.status == "pending" and current.runner == runner

    def put_state(self, state: JobState, runner: str | None = None) -> bool:
        """Write the status; with `runner`, only while `held_by(runner)` (False when skipped).

        Read-then-write, not compare-and-swap (S3 has none here): it keeps a late heartbeat or a second
        runner from rewriting a finished job, though two writes at the very same moment can still both land.
        """
        if runner is not None and not self.held_by(state.job_id, runner):
            return False
        state.updated_at = self.clock()
        write_bytes_atomic(self.fs, self._job(state.job_id, "status.json"), state.model_dump_json().encode())
        return True

    def finish(self, state: JobState, pngs: list[bytes], summary: bytes, runner: str | None = None) -> bool:
        """Results before the status that points at them; then the markers move. `runner`: as in `put_state`."""
        if runner is not None and not self.held_by(state.job_id, runner):
            return False
        for i, png in enumerate(pngs):
            write_bytes_atomic(self.fs, self._job(state.job_id, "photos", f"{i}.png"), png)
        write_bytes_atomic(self.fs, self._job(state.job_id, "result.json"), summary)
        return self._close(state, "ok", None, runner)

    def fail(self, state: JobState, error: str, runner: str | None = None) -> bool:
        return self._close(state, "failed", error, runner)

    def _close(self, state: JobState, status: str, error: str | None, runner: str | None) -> bool:
        state.status, state.error, state.finished_at = status, error, self.clock()
        state.runner, state.lease_until = None, 0.0
        if not self.put_state(state, runner):
            return False
        write_bytes_atomic(self.fs, join(self.root, "finished", f"{int(state.finished_at)}-{state.job_id}"), b"")
        self._remove(self._pending(state.job_id))
        self._remove(self._job(state.job_id, "input"), recursive=True)  # users' photos are kept no longer than needed
        return True

    def result(self, job_id: str) -> bytes | None:
        return self._read(self._job(job_id, "result.json"))

    def photo(self, job_id: str, index: int) -> bytes | None:
        return self._read(self._job(job_id, "photos", f"{index}.png"))

    def drop_marker(self, job_id: str) -> None:
        self._remove(self._pending(job_id))

    def delete(self, job_id: str) -> None:
        self._remove(self._job(job_id), recursive=True)
        self._remove(self._pending(job_id))

    # -- sweeps ---------------------------------------------------------------------------------
    def pending_ids(self) -> list[str]:
        return self._list("pending")

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
        self.delete(job_id)
        self._remove(join(self.root, "finished", marker))
