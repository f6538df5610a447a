"""One writer per OUTPUT: the lease `OUT/.capray-lease.json`, on the project's one lease primitive.

Two jobs writing one OUTPUT would race: on a local disk one job's temp-file cleanup deletes the other's
in-flight files; on S3 both spend GPUs on the same identities and commit over each other. So a job
first takes OUTPUT's lease (`capray.io.lease`: conditional create, `If-Match` renewals, age by the
store's clock, a fencing generation); a second job exits 2 naming the holder. The lease is taken
over when it was not renewed for `batch.lease_ttl_s`, at once when its holder was a process on this
host that no longer exists, or at once with `--force-unlock`. Every commit checks the fence
(`Plan.fence`) before it writes, and a job whose renewals keep failing stops before its lease can
expire: once another job may hold OUTPUT, this one writes nothing more.
The name starts with a dot, which identity names never do, so it can never be an identity folder.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

from capray.io import lease as primitive
from capray.io.lease import LeaseHeld, LeaseLost  # noqa: F401  (what callers catch)
from capray.io.storage import join

LEASE_FILE = ".capray-lease.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_alive(body: dict[str, Any]) -> bool:
    """False when the holder was a process on this host that no longer exists (taken over at once)."""
    pid = body.get("pid")
    return not (body.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid))


class OutputLease(primitive.Lease):
    """OUTPUT's lease; `job_id` names this job in the lease and in the refusal a second job prints."""

    @property
    def job_id(self) -> str:
        return self.holder


def acquire(output: str, ttl_s: float, storage_options: dict[str, Any] | None = None, *,
            force: bool = False, on_lost: Callable[[], None] | None = None) -> OutputLease:
    """Take OUTPUT's lease and start renewing it; raises `LeaseHeld` naming a live holder.

    `on_lost` runs (in the renewal thread) once the lease is lost; the command passes
    `_thread.interrupt_main`, so its driver loop stops with `LeaseLost`."""
    job_id = uuid.uuid4().hex
    who = (f"job {job_id} on host {socket.gethostname()} (pid {os.getpid()}), "
           f"started {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
    uri = join(output, LEASE_FILE)
    try:
        return primitive.acquire(uri, ttl_s, storage_options, holder=job_id, who=who, force=force,
                                 alive=holder_alive, on_lost=on_lost, lease_type=OutputLease,
                                 extra={"job_id": job_id, "host": socket.gethostname(), "pid": os.getpid()})
    except LeaseHeld as exc:
        raise LeaseHeld(f"OUTPUT is in use by another capray job: {exc}. Wait for it to finish; a lease not "
                        f"renewed for {ttl_s:.0f}s (batch.lease_ttl_s) expires, and --force-unlock takes it over "
                        "at once (only when you know that job is dead)") from None
