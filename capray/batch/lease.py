"""One writer per OUTPUT: a lease object `OUT/.capray-lease.json`, created atomically, renewed while the job runs.

Two jobs writing one OUTPUT would race: on a local disk one job's temp-file cleanup deletes the other's
in-flight files; on S3 both spend GPUs on the same identities. So a job first creates the lease with an
exclusive create (`O_EXCL` locally; `If-None-Match: *` on S3 through s3fs's `mode="create"`): exactly
one job gets it, the other exits 2 naming the holder. The holder rewrites it every `ttl/3` seconds.

A lease whose holder died is taken over when it was not renewed for `batch.lease_ttl_s`, at once when
the holder was a process on this host that no longer exists, or at once with `--force-unlock`. A
take-over is a delete and a new exclusive create; two jobs taking over at the same moment can both
get through, so every renewal first checks that the lease still names this job, and a job that finds
another holder there stops (`LeaseLost`) instead of writing on: at most one writer survives a renewal.
The name starts with a dot, which identity names never do, so it can never be an identity folder.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from capray.io.storage import get_fs, is_local, join, write_bytes_atomic

log = logging.getLogger(__name__)

LEASE_FILE = ".capray-lease.json"


class LeaseHeld(Exception):
    """Another live job holds OUTPUT's lease (exit code 2)."""


class LeaseLost(Exception):
    """This job's lease was taken over while it ran: it stops rather than write beside another job."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(body: dict[str, Any], now: float | None = None) -> str:
    age = (now or time.time()) - float(body.get("renewed_at", 0))
    return (f"job {body.get('job_id', '?')} on host {body.get('host', '?')} (pid {body.get('pid', '?')}), "
            f"started {body.get('started', '?')}, last renewed {age:.0f}s ago")


def abandoned(body: dict[str, Any], ttl_s: float, now: float | None = None) -> str | None:
    """Why the lease in `body` may be taken over, or None while its holder may still be alive."""
    now = now or time.time()
    if now - float(body.get("renewed_at", 0)) > ttl_s:
        return f"not renewed for over {ttl_s:.0f}s"
    if body.get("host") == socket.gethostname() and isinstance(body.get("pid"), int) and not _pid_alive(body["pid"]):
        return "its process on this host is gone"
    return None


@dataclass
class Lease:
    """A held lease; `release()` (or leaving the `with` block) stops renewing and deletes it."""

    uri: str
    ttl_s: float
    storage_options: dict[str, Any]
    body: dict[str, Any]
    on_lost: Callable[[], None] | None = None  # called from the renewal thread when another job holds it
    lost: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def job_id(self) -> str:
        return self.body["job_id"]

    def _fs(self):
        return get_fs(self.uri, self.storage_options)

    def start(self) -> Lease:
        self._thread = threading.Thread(target=self._renew_loop, name="capray-lease", daemon=True)
        self._thread.start()
        return self

    def renew(self) -> bool:
        """Rewrite the lease if it still names this job; False (and `lost` set) when another holds it."""
        fs, path = self._fs()
        current = _read(fs, path)
        if current is None or current.get("job_id") != self.job_id:
            self.lost = ("the lease on the output was taken over by "
                         + (describe(current) if current else "nobody (it was deleted)"))
            return False
        self.body["renewed_at"] = time.time()
        _overwrite(fs, path, self.body)
        return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self.renew():
                    log.error("%s; stopping this job", self.lost)
                    if self.on_lost is not None:
                        self.on_lost()
                    return
            except Exception as exc:  # a storage hiccup: try again next period (the TTL leaves room)
                log.warning("renewing the output lease failed (%s: %s)", type(exc).__name__, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.lost:
            return
        fs, path = self._fs()
        current = _read(fs, path)
        if current is not None and current.get("job_id") == self.job_id:
            fs.rm_file(path)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fs, path: str) -> dict[str, Any] | None:
    fs.invalidate_cache(path)
    try:
        with fs.open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None
    try:
        return json.loads(data)
    except ValueError:  # created but not yet written (local O_EXCL), or damaged: its age decides
        try:
            mtime = fs.modified(path).timestamp()
        except (OSError, NotImplementedError):
            mtime = time.time()
        return {"job_id": "?", "host": "?", "pid": "?", "started": "?", "renewed_at": mtime}


def _create(fs, path: str, body: dict[str, Any]) -> bool:
    """Exclusive create; False when the lease already exists."""
    data = json.dumps(body, indent=1).encode()
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return True
    try:
        fs.pipe_file(path, data, mode="create")  # S3: PutObject with If-None-Match: *
        return True
    except FileExistsError:
        return False
    except OSError:  # some stores answer 412 without naming the condition
        fs.invalidate_cache(path)
        if fs.exists(path):
            return False
        raise


def _overwrite(fs, path: str, body: dict[str, Any]) -> None:
    write_bytes_atomic(fs, path, json.dumps(body, indent=1).encode())


def acquire(output: str, ttl_s: float, storage_options: dict[str, Any] | None = None, *,
            force: bool = False, on_lost: Callable[[], None] | None = None) -> Lease:
    """Take OUTPUT's lease and start renewing it; raises `LeaseHeld` naming a live holder.

    `on_lost` runs (in the renewal thread) if another job takes the lease over; the command passes
    `_thread.interrupt_main`, so its driver loop stops with `LeaseLost`."""
    so = dict(storage_options or {})
    uri = join(output, LEASE_FILE)
    fs, path = get_fs(uri, so)
    body = {"job_id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "renewed_at": time.time(),
            "ttl_s": ttl_s}
    for _ in range(3):
        if _create(fs, path, body):
            return Lease(uri, ttl_s, so, body, on_lost).start()
        current = _read(fs, path)
        if current is None:  # released between our create and our read: try again
            continue
        why = "--force-unlock" if force else abandoned(current, ttl_s)
        if why is None:
            raise LeaseHeld(f"OUTPUT is in use by another capray job: {describe(current)} (lease {uri}). "
                            f"Wait for it to finish; a lease not renewed for {ttl_s:.0f}s "
                            "(batch.lease_ttl_s) expires, and --force-unlock takes it over at once")
        log.warning("taking over the lease on OUTPUT (%s): was %s", why, describe(current))
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass
    raise LeaseHeld(f"could not take the lease {uri}: other jobs keep creating it")
