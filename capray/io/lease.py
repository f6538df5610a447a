"""The one lease primitive: "only one may do this", for OUTPUT's writer and for each Serve job's runner.

A lease is a small JSON object. Every change to it is conditional on the version its writer last
saw, so two contenders can never both win:

- create with `If-None-Match: *` (a local disk: `O_EXCL`): exactly one contender creates it;
- renew, release and take-over with `If-Match` on the ETag just read (a local disk: a compare-and-swap
  under an `flock`): whoever read an older version gets 412 and loses;
- its age is judged by the store's own clock — on S3 the response's `Date` minus the object's
  `LastModified`, both the server's; on a local disk the file's mtime against this host's clock —
  never by comparing the holder's clock with a reader's (a laptop 90 s fast takes nothing over);
- every take-over bumps a fencing `generation`. A holder checks, before each commit, that the lease
  still carries its holder id and generation (`Lease.check`, one GET), and a holder whose renewals
  keep failing gives up (`on_lost`) before the lease can expire, so it never writes after a
  successor may have started.

A lease can also outlive its holder as a record: `Lease.finish(body)` writes its last version under
the same condition (a Serve job's status is the lease of whoever runs it, and stays as the outcome).

A create whose response was lost and that botocore retried sees 412 on its own write: the lease then
names this holder, and the create counts as won. Stores without conditional writes (other fsspec
backends) get a best-effort lease, and a warning.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from capray.io.storage import get_fs, is_local, write_bytes_atomic

log = logging.getLogger(__name__)


class LeaseHeld(Exception):
    """Another live holder has the lease."""


class LeaseLost(Exception):
    """This holder's lease was taken over, or could not be renewed in time: it must stop writing."""


@dataclass(frozen=True)
class Seen:
    """One read of the lease: its body, its version and its age by the store's clock."""

    body: dict[str, Any]
    etag: str
    age_s: float


class Backend(Protocol):
    def create(self, data: bytes) -> str | None: ...  # the new ETag, or None when the lease exists
    def read(self) -> Seen | None: ...
    def replace(self, data: bytes, etag: str) -> str | None: ...  # None when it changed since `etag`
    def delete(self, etag: str) -> bool: ...


def _body(data: bytes) -> dict[str, Any]:
    try:
        body = json.loads(data)
        return body if isinstance(body, dict) else {}
    except ValueError:  # damaged (or a local create not yet written): an unknown holder; its age decides
        return {}


def _digest(data: bytes) -> str:
    """The ETag of a store without one: the content's hash."""
    return hashlib.sha256(data).hexdigest()


class LocalBackend:
    """A local disk: `O_EXCL` create; replace and delete compare the content's hash under an `flock`
    (between processes of this host; a network file system's locks are only as good as its own)."""

    def __init__(self, fs: Any, path: str):
        self.fs, self.path = fs, path

    @contextlib.contextmanager
    def _locked(self):
        """An exclusive `flock` on the lease's folder: no lock file is left beside the lease."""
        import fcntl

        fd = os.open(os.path.dirname(self.path), os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _current(self) -> tuple[bytes, float] | None:
        """(content, mtime) of the lease, or None; call under the lock."""
        try:
            with open(self.path, "rb") as fh:
                data = fh.read()
            return data, os.stat(self.path).st_mtime
        except FileNotFoundError:
            return None

    def _is(self, etag: str) -> bool:
        """The lease exists and is the version `etag` names; call under the lock."""
        current = self._current()
        return current is not None and _digest(current[0]) == etag

    def _exists(self) -> bool:
        return os.path.isdir(os.path.dirname(self.path))

    def create(self, data: bytes) -> str | None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with self._locked():
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return None
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        return _digest(data)

    def read(self) -> Seen | None:
        if not self._exists():
            return None
        with self._locked():
            current = self._current()
        if current is None:
            return None
        data, mtime = current
        return Seen(_body(data), _digest(data), time.time() - mtime)

    def replace(self, data: bytes, etag: str) -> str | None:
        if not self._exists():
            return None
        with self._locked():
            if not self._is(etag):
                return None
            write_bytes_atomic(self.fs, self.path, data)
        return _digest(data)

    def delete(self, etag: str) -> bool:
        if not self._exists():
            return False
        with self._locked():
            if not self._is(etag):
                return False
            os.remove(self.path)
        return True


class S3Backend:
    """S3 conditional writes (`If-None-Match`, `If-Match`, 2024) through s3fs's own client and retries."""

    def __init__(self, fs: Any, path: str):
        self.fs = fs
        self.bucket, self.key, _ = fs.split_path(path)

    def _call(self, method: str, **kwargs) -> dict[str, Any] | None:
        """The response, or None on 412/409 (a precondition lost, or a concurrent conditional write)."""
        from botocore.exceptions import ClientError
        from fsspec.asyn import sync

        async def call():
            client = await self.fs.set_session()
            response = await getattr(client, method)(Bucket=self.bucket, Key=self.key, **kwargs)
            if method == "get_object":
                async with response["Body"] as body:
                    response["Data"] = await body.read()
            return response

        try:
            return sync(self.fs.loop, call)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = exc.response.get("Error", {}).get("Code")
            if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return None
            if code in ("NoSuchKey", "404") or status == 404:
                raise FileNotFoundError(self.key) from exc
            raise

    def create(self, data: bytes) -> str | None:
        response = self._call("put_object", Body=data, IfNoneMatch="*")
        return None if response is None else response["ETag"]

    def read(self) -> Seen | None:
        try:
            response = self._call("get_object")
        except FileNotFoundError:
            return None
        if response is None:
            return None
        served = response["ResponseMetadata"]["HTTPHeaders"].get("date")
        now = email.utils.parsedate_to_datetime(served).timestamp() if served else time.time()
        return Seen(_body(response["Data"]), response["ETag"], now - response["LastModified"].timestamp())

    def replace(self, data: bytes, etag: str) -> str | None:
        response = self._call("put_object", Body=data, IfMatch=etag)
        return None if response is None else response["ETag"]

    def delete(self, etag: str) -> bool:
        try:
            return self._call("delete_object", IfMatch=etag) is not None
        except FileNotFoundError:
            return False


class PlainBackend:
    """Any other fsspec store: no conditional writes, so the lease is best effort (read, then write)."""

    def __init__(self, fs: Any, path: str):
        self.fs, self.path = fs, path

    def _data(self) -> bytes | None:
        self.fs.invalidate_cache(self.path)
        try:
            return self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None

    def _is(self, etag: str) -> bool:
        current = self._data()
        return current is not None and _digest(current) == etag

    def create(self, data: bytes) -> str | None:
        if self._data() is not None:
            return None
        write_bytes_atomic(self.fs, self.path, data)
        return _digest(data)

    def read(self) -> Seen | None:
        data = self._data()
        if data is None:
            return None
        try:
            age = time.time() - self.fs.modified(self.path).timestamp()
        except (OSError, NotImplementedError):
            age = 0.0
        return Seen(_body(data), _digest(data), age)

    def replace(self, data: bytes, etag: str) -> str | None:
        if not self._is(etag):
            return None
        write_bytes_atomic(self.fs, self.path, data)
        return _digest(data)

    def delete(self, etag: str) -> bool:
        if not self._is(etag):
            return False
        self.fs.rm_file(self.path)
        return True


def backend_for(uri: str, storage_options: dict[str, Any] | None = None) -> Backend:
    return backend_on(*get_fs(uri, storage_options))


def backend_on(fs: Any, path: str) -> Backend:
    """The conditional-write backend for `path` on an fsspec filesystem already open."""
    if is_local(fs):
        return LocalBackend(fs, path)
    if type(fs).__name__ == "S3FileSystem":
        return S3Backend(fs, path)
    return PlainBackend(fs, path)


def _encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, indent=1, sort_keys=True).encode()


@dataclass
class Lease:
    """A held lease. `check()` before each commit; `release()` (or the `with` block) gives it back."""

    uri: str
    ttl_s: float
    backend: Backend
    body: dict[str, Any]
    etag: str
    on_lost: Callable[[], None] | None = None  # called from the renewal thread once the lease is lost
    refresh: Callable[[], dict[str, Any]] | None = None  # fields each renewal writes too (e.g. progress)
    period_s: float | None = None  # between renewals; default ttl_s / 3
    lost: str | None = None
    released: bool = False
    renewed: float = field(default_factory=time.monotonic)  # last renewal that succeeded, this process's clock
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def holder(self) -> str:
        return self.body["holder"]

    @property
    def generation(self) -> int:
        return int(self.body["generation"])

    def fence(self) -> dict[str, Any]:
        """What a commit elsewhere (a Ray task) checks the lease against: `check_fence`."""
        return {"uri": self.uri, "holder": self.holder, "generation": self.generation}

    def start(self) -> Lease:
        """Start renewing in a thread (a lease is held from `acquire`/`take_over` on; this keeps it)."""
        self._thread = threading.Thread(target=self._renew_loop, name="capray-lease", daemon=True)
        self._thread.start()
        return self

    def renew(self) -> bool:
        """Rewrite the lease if it is still the version this holder wrote; False (and `lost`) otherwise."""
        body = dict(self.body, **(self.refresh() if self.refresh else {}),
                    renewals=int(self.body.get("renewals", 0)) + 1)
        etag = self.backend.replace(_encode(body), self.etag)
        if etag is None:
            seen = self.backend.read()
            if seen is not None and seen.body.get("holder") == self.holder and seen.etag != self.etag:
                self.body, self.etag = seen.body, seen.etag  # our own write, retried after a lost response
                self.renewed = time.monotonic()
                return True
            self.lost = "the lease was taken over by " + (describe(seen) if seen else "nobody (it was deleted)")
            return False
        self.body, self.etag, self.renewed = body, etag, time.monotonic()
        return True

    def _give_up(self, why: str) -> None:
        self.lost = why
        log.error("%s; stopping", why)
        if self.on_lost is not None:
            self.on_lost()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.period_s or self.ttl_s / 3):
            try:
                if not self.renew():
                    self._give_up(self.lost or "the lease was lost")
                    return
            except Exception as exc:  # a storage hiccup: retried next period, while the TTL leaves room
                log.warning("renewing the lease %s failed (%s: %s)", self.uri, type(exc).__name__, exc)
            if time.monotonic() - self.renewed > self.ttl_s * 2 / 3:  # stop before a successor may start
                self._give_up(f"the lease {self.uri} could not be renewed for {self.ttl_s * 2 / 3:.0f}s")
                return

    def check(self) -> None:
        """Raise `LeaseLost` unless this holder still holds the lease (before a commit)."""
        if self.lost:
            raise LeaseLost(self.lost)
        check_fence(self.fence(), self.backend)

    def _stop_renewing(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still this holder's version (once; idempotent)."""
        self._stop_renewing()
        if not self.lost and not self.released:
            self.backend.delete(self.etag)
        self.released = True

    def finish(self, body: dict[str, Any]) -> bool:
        """Stop renewing and leave `body` as the lease's last version, if it is still this holder's (a
        record that outlives its holder, e.g. a finished job's status); False when it is not (or no more)."""
        self._stop_renewing()
        if self.lost or self.released:
            return False
        self.released = True
        data = _encode(body)
        if self.backend.replace(data, self.etag) is not None:
            self.body = body
            return True
        seen = self.backend.read()  # a retried write that had landed reads back as ours
        if seen is not None and seen.body == json.loads(data):
            self.body, self.etag = seen.body, seen.etag
            return True
        self.lost = "the lease was taken over by " + (describe(seen) if seen else "nobody (it was deleted)")
        return False

    def abandon(self) -> None:
        """Stop renewing and leave the lease as it is, to expire (this holder is stopping mid-work)."""
        self._stop_renewing()
        self.released = True

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_fence(fence: dict[str, Any], backend: Backend | None = None,
                storage_options: dict[str, Any] | None = None) -> None:
    """Raise `LeaseLost` unless the lease at `fence["uri"]` still names its holder and generation."""
    seen = (backend or backend_for(fence["uri"], storage_options)).read()
    if seen is None or seen.body.get("holder") != fence["holder"] or seen.body.get("generation") != fence["generation"]:
        raise LeaseLost(f"the lease {fence['uri']} is no longer held by this job (now: "
                        f"{describe(seen) if seen else 'nobody'}); nothing more is committed")


def describe(seen: Seen) -> str:
    b = seen.body
    return (f"{b.get('who') or b.get('holder', 'an unknown holder')} (generation {b.get('generation', '?')}), "
            f"last renewed {seen.age_s:.0f}s ago by the store's clock")


def _new_body(holder: str, generation: int, who: str, ttl_s: float, extra: dict[str, Any] | None) -> dict[str, Any]:
    return {**(extra or {}), "holder": holder, "generation": generation, "who": who, "ttl_s": ttl_s}


def take_over(backend: Backend, seen: Seen, ttl_s: float, *, uri: str = "", holder: str | None = None,
              who: str = "", extra: dict[str, Any] | None = None, lease_type: type[Lease] = Lease,
              **lease_options: Any) -> Lease | None:
    """Replace exactly the version `seen` (the next fencing generation): the new `Lease` (not yet renewing:
    `start()` it), or None when the lease changed since `seen` was read — another contender won."""
    body = _new_body(holder or uuid.uuid4().hex, int(seen.body.get("generation", 0)) + 1, who, ttl_s, extra)
    etag = backend.replace(_encode(body), seen.etag)  # only one contender replaces the version it read
    return None if etag is None else lease_type(uri, ttl_s, backend, body, etag, **lease_options)


def create(backend: Backend, ttl_s: float, *, uri: str = "", holder: str | None = None, who: str = "",
           extra: dict[str, Any] | None = None, lease_type: type[Lease] = Lease, **lease_options: Any) -> Lease | None:
    """Create the lease (generation 1) if it does not exist: the new `Lease` (not yet renewing), or None."""
    holder = holder or uuid.uuid4().hex
    body = _new_body(holder, 1, who, ttl_s, extra)
    etag = backend.create(_encode(body))
    if etag is None:  # someone else created it first, or a retry of our own create
        mine = backend.read()
        if mine is None or mine.body.get("holder") != holder:
            return None
        etag = mine.etag
    return lease_type(uri, ttl_s, backend, body, etag, **lease_options)


def acquire(uri: str, ttl_s: float, storage_options: dict[str, Any] | None = None, *, holder: str | None = None,
            who: str = "", extra: dict[str, Any] | None = None, force: bool = False,
            alive: Callable[[dict[str, Any]], bool] | None = None, on_lost: Callable[[], None] | None = None,
            lease_type: type[Lease] = Lease) -> Lease:
    """Take the lease at `uri` and start renewing it; `LeaseHeld` naming a live holder.

    A lease older than `ttl_s` (by the store's clock) is taken over, and at once with `force` or when
    `alive(body)` says its holder is gone (e.g. a process on this host that no longer exists).
    `who` describes the holder to whoever is refused; `extra` goes into the lease's body as it is."""
    backend = backend_for(uri, storage_options)
    if isinstance(backend, PlainBackend):  # said once, by the holder (not by every commit's fence check)
        log.warning("the store of %s has no conditional writes: its lease is best effort", uri)
    holder = holder or uuid.uuid4().hex
    mine = {"uri": uri, "holder": holder, "who": who, "extra": extra, "lease_type": lease_type, "on_lost": on_lost}
    for _ in range(5):
        seen = backend.read()
        if seen is None:
            held = create(backend, ttl_s, **mine)
            if held is not None:
                return held.start()
            continue
        why = ("forced" if force else f"not renewed for over {ttl_s:.0f}s" if seen.age_s > ttl_s
               else "its holder is gone" if alive is not None and not alive(seen.body) else None)
        if why is None:
            raise LeaseHeld(f"{describe(seen)} (lease {uri})")
        held = take_over(backend, seen, ttl_s, **mine)
        if held is not None:
            log.warning("took over the lease %s (%s): was %s", uri, why, describe(seen))
            return held.start()
    raise LeaseHeld(f"could not take the lease {uri}: other holders keep changing it")
