"""Attempts per group, counted outside the actor that runs it, so a group that kills its process still ends.

Ray Data's actor pool restarts a dead actor and re-runs its task without limit (`max_restarts=-1`,
`max_task_retries=-1`, its defaults, which capray keeps so that node losses and preemptions heal). A
group that segfaults, exhausts host memory or calls `os._exit` would therefore take down actor after
actor forever. So every attempt is counted in a small ledger actor that outlives the protect actors
(one per job, pinned to the head node, no CPU): each attempt begins with `begin(identity)`, and a
group whose count is past `1 + batch.group_retries` is recorded `failed` without running again. An
actor that ends itself on purpose (a group past `batch.group_timeout_s`, or a sick device) records why
first, so the retried task can say it. Finished groups are dropped: the ledger holds only groups in flight.

The ledger is also where a stopping run (its time box, SIGTERM) says so: once `stop()` was called,
`begin` answers DEFERRED instead of a new attempt, so no group starts after the stop while the
groups already running finish.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)


DEFERRED = "deferred: the run is stopping (time box or SIGTERM); the next run protects it"


class AttemptLedger:
    """identity → attempts begun, last engine error, verdict (a reason to stop without another attempt)."""

    def __init__(self) -> None:
        self._groups: dict[str, dict[str, Any]] = {}
        self._stopping = False

    def stop(self) -> None:
        self._stopping = True

    def stopping(self) -> bool:
        return self._stopping

    def begin(self, key: str) -> tuple[int, str | None, str | None]:
        if self._stopping:
            return 0, None, DEFERRED
        entry = self._groups.setdefault(key, {"attempts": 0, "error": None, "verdict": None})
        entry["attempts"] += 1
        return entry["attempts"], entry["error"], entry["verdict"]

    def record(self, key: str, error: str | None = None, verdict: str | None = None) -> None:
        entry = self._groups.setdefault(key, {"attempts": 0, "error": None, "verdict": None})
        entry["error"] = error or entry["error"]
        entry["verdict"] = verdict or entry["verdict"]

    def finish(self, key: str) -> None:
        self._groups.pop(key, None)

    def in_flight(self) -> int:
        return len(self._groups)


class LedgerClient:
    """The protect actor's view of the job's ledger; a local one when there is none (or it is gone)."""

    def __init__(self, name: str | None):
        self._remote = None
        self._local = AttemptLedger()
        if name:
            import ray

            try:
                self._remote = ray.get_actor(name)
            except ValueError as exc:  # not found: count here rather than fail the actor
                log.warning("attempt ledger %s not found (%s); counting attempts in this actor", name, exc)

    def _call(self, method: str, *args):
        if self._remote is not None:
            import ray

            try:
                return ray.get(getattr(self._remote, method).remote(*args), timeout=60)
            except Exception as exc:  # the ledger's node went away: count here (bounded per actor)
                log.warning("the attempt ledger is unreachable (%s: %s); counting attempts in this actor",
                            type(exc).__name__, exc)
                self._remote = None
        return getattr(self._local, method)(*args)

    def begin(self, key: str) -> tuple[int, str | None, str | None]:
        return tuple(self._call("begin", key))

    def record(self, key: str, error: str | None = None, verdict: str | None = None) -> None:
        self._call("record", key, error, verdict)

    def finish(self, key: str) -> None:
        self._call("finish", key)

    def stop(self) -> None:
        self._call("stop")

    def stopping(self) -> bool:
        return bool(self._call("stopping"))


@contextlib.contextmanager
def job_ledger() -> Iterator[str]:
    """Start the job's ledger actor on this (the driver's) node; yields its name, kills it afterwards."""
    import ray

    from capray.cluster import ON_HEAD_NODE

    name = f"capray-attempts-{uuid.uuid4().hex[:12]}"
    handle = ray.remote(AttemptLedger).options(name=name, num_cpus=0, **ON_HEAD_NODE).remote()
    ray.get(handle.in_flight.remote())  # started before any actor looks for it
    try:
        yield name
    finally:
        ray.kill(handle)
