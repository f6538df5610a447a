"""Every byte capray reads or writes goes through fsspec, so a local folder and `s3://` look the same.

Writes are atomic: on a local (POSIX) filesystem a file is written under a hidden temporary name in
the same directory and renamed into place; on an object store a single PUT is already atomic (the
object either exists whole or not at all). A reader therefore never sees a half-written file under
its final name, which is what makes resume after a crash safe.
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

TMP_PREFIX = ".capray-tmp-"
_SECRET_KEY = re.compile(r"(key|secret|token|password|credential)", re.IGNORECASE)


def normalize_uri(uri: str) -> str:
    """Absolute local paths for plain paths (and file://), unchanged for remote URLs; no trailing '/'."""
    uri = str(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" not in uri:
        return os.path.realpath(os.path.expanduser(uri))
    return uri.rstrip("/")


# botocore's own retries for every S3 request (throttling `SlowDown`, 5xx, dropped connections):
# "adaptive" adds client-side rate limiting on top of standard mode's backoff, which is what rides out
# a throttling burst when hundreds of workers hit one prefix. Override with
# `batch.storage_options.config_kwargs.retries`.
S3_RETRIES = {"mode": "adaptive", "max_attempts": 10}
S3_PROTOCOLS = ("s3://", "s3a://")


def with_retry_defaults(uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """Storage options for `uri` with capray's retry defaults filled in where the user set none."""
    options = dict(storage_options or {})
    if uri.startswith(S3_PROTOCOLS):
        config_kwargs = dict(options.get("config_kwargs") or {})
        config_kwargs.setdefault("retries", dict(S3_RETRIES))
        options["config_kwargs"] = config_kwargs
    return options


def get_fs(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URI. Remote options (endpoint, keys) come from config or env."""
    uri = normalize_uri(uri)
    options = with_retry_defaults(uri, storage_options) if "://" in uri else {}
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


class TransientStorageError(Exception):
    """A storage call failed in a way a retry may fix (after botocore's own retries, where they apply).

    Stages raise it instead of recording a failure; Ray Data re-runs the task with exponential
    backoff (`retried_map_errors` matches this class name, `max_map_retries = batch.io_retries`).
    """


TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
                    errno.ECONNREFUSED, errno.EPIPE, errno.EREMOTEIO, errno.EIO}


def is_transient(exc: BaseException) -> bool:
    """True for errors of the storage service or the network (retry), not of the object (a missing or
    forbidden file stays missing or forbidden)."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return True  # s3fs: SlowDown/ServiceUnavailable → EBUSY, InternalError → EREMOTEIO
    names = {cls.__name__ for cls in type(exc).__mro__}  # botocore / aiohttp without importing them
    return bool(names & {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                         "ConnectionClosedError", "ResponseStreamingError", "IncompleteReadError",
                         "ClientConnectionError", "ServerDisconnectedError", "ClientPayloadError"})


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def arrow_fs(fs: fsspec.AbstractFileSystem):
    """A pyarrow filesystem for an fsspec one (native for local disks)."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem
    from pyarrow.fs import LocalFileSystem as ArrowLocalFileSystem

    return ArrowLocalFileSystem() if is_local(fs) else PyFileSystem(FSSpecHandler(fs))


def join(uri: str, *parts: str) -> str:
    """Join URI parts with '/', whatever the filesystem (parts are already sanitised names)."""
    return posixpath.join(uri.rstrip("/"), *parts)


def _contains(outer: str, inner: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def overlaps(a: str, b: str) -> bool:
    """True when one location is the other or lies inside it (same scheme, normalised)."""
    a, b = normalize_uri(a), normalize_uri(b)
    return _contains(a, b) or _contains(b, a)


def inside(uri: str, root: str) -> bool:
    return _contains(normalize_uri(root), normalize_uri(uri))


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` to `path` so that `path` either holds all of it or does not change."""
    parent = posixpath.dirname(path)
    if is_local(fs):
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f"{TMP_PREFIX}{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    else:  # object stores: one PUT is atomic
        fs.pipe_file(path, data)


def remove_stale_temps(fs: fsspec.AbstractFileSystem, directory: str) -> int:
    """Delete temp files a killed writer left behind in a local directory; returns how many."""
    if not is_local(fs) or not os.path.isdir(directory):
        return 0
    removed = 0
    for name in os.listdir(directory):
        if name.startswith(TMP_PREFIX):
            try:
                os.unlink(os.path.join(directory, name))
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def read_bytes(fs: fsspec.AbstractFileSystem, path: str, max_bytes: int) -> bytes:
    """Read a whole file, refusing files larger than `max_bytes` before reading them."""
    size = fs.size(path)
    if size is not None and size > max_bytes:
        raise ValueError(f"file is {size} bytes, over the batch.max_file_bytes limit of {max_bytes}")
    with fs.open(path, "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"file is over the batch.max_file_bytes limit of {max_bytes}")
    return data


def redact(options: Any) -> Any:
    """Storage options with secrets masked, for run.json and logs."""
    if isinstance(options, dict):
        return {k: ("***" if _SECRET_KEY.search(str(k)) and v else redact(v)) for k, v in options.items()}
    if isinstance(options, list):
        return [redact(v) for v in options]
    return options


def redacted_config(cfg: Any) -> dict[str, Any]:
    """A `CaprayConfig` as written down (run.json, results.json): every storage option that names a key,
    secret, token or password masked, the batch job's and the job store's alike."""
    effective = cfg.model_dump(mode="json")
    effective["batch"]["storage_options"] = redact(effective["batch"]["storage_options"])
    effective["serve"]["store_options"] = redact(effective["serve"]["store_options"])
    return effective
