"""Submitted protection jobs, kept in the ingress replica until their result has been collected.

PGD on a group takes seconds to minutes, longer than an HTTP request should stay open, so the API
is submit-and-poll. Finished results are held for `job_ttl_s` and at most `max_finished_jobs` of
them (oldest dropped first); pending jobs are never dropped. The table lives in one ingress replica:
a restart forgets its jobs (clients resubmit; the same request gives the same pixels).
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Job:
    job_id: str
    created_at: float
    status: str = "pending"  # pending → done | failed
    finished_at: float | None = None
    error: str | None = None
    result: Any = None


class JobTable:
    def __init__(self, max_finished: int, ttl_s: float, clock: Callable[[], float] = time.time):
        self.max_finished, self.ttl_s, self.clock = max_finished, ttl_s, clock
        self._pending: dict[str, Job] = {}
        self._finished: OrderedDict[str, Job] = OrderedDict()  # in finishing order

    def create(self) -> Job:
        job = Job(job_id=uuid.uuid4().hex, created_at=self.clock())
        self._pending[job.job_id] = job
        return job

    def get(self, job_id: str) -> Job | None:
        self._evict()
        return self._pending.get(job_id) or self._finished.get(job_id)

    def pending(self) -> int:
        return len(self._pending)

    def finish(self, job_id: str, result: Any) -> None:
        self._close(job_id, "done", result=result)

    def fail(self, job_id: str, error: str) -> None:
        self._close(job_id, "failed", error=error)

    def _close(self, job_id: str, status: str, **fields: Any) -> None:
        job = self._pending.pop(job_id)
        job.status, job.finished_at = status, self.clock()
        for key, value in fields.items():
            setattr(job, key, value)
        self._finished[job_id] = job
        self._evict()

    def _evict(self) -> None:
        now = self.clock()
        while self._finished:
            oldest = next(iter(self._finished.values()))
            if len(self._finished) > self.max_finished or now - oldest.finished_at > self.ttl_s:
                self._finished.popitem(last=False)
            else:
                break
