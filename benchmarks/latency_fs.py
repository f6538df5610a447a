"""An fsspec filesystem that models an object store on a local folder: it counts requests and waits a
fixed latency for each (LIST per 1,000 keys, HEAD, GET, PUT, DELETE), like S3 at ~20 ms a request.

URIs are `latency:///abs/local/path`. Each process counts its own requests (`LatencyFS.counts`), so a
benchmark reads the driver's from its own process; with CAPRAY_BENCH_REQUEST_LOG set, every process
also appends one byte per request to that file, so requests of the driver and every Ray worker
together are its size. Ray workers get the filesystem registered through `register` as their
`worker_process_setup_hook`; the latency comes from CAPRAY_BENCH_LATENCY_S.
There are no directories, as on S3: writes create what they need, `mkdir` does nothing; `find` is
S3's flat ListObjectsV2, one LIST per 1,000 keys.
"""

from __future__ import annotations

import collections
import math
import os
import time

import fsspec
from fsspec.spec import AbstractFileSystem

PAGE = 1000


class LatencyFS(AbstractFileSystem):
    protocol = "latency"
    root_marker = "/"
    cachable = False
    counts: collections.Counter = collections.Counter()

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith("latency://"):
            path = path[len("latency://"):]
        return path.rstrip("/") or "/"

    _log_fd: int | None = None

    def _request(self, kind: str, n: int = 1) -> None:
        LatencyFS.counts[kind] += n
        log = os.environ.get("CAPRAY_BENCH_REQUEST_LOG")
        if log:
            if LatencyFS._log_fd is None:
                LatencyFS._log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(LatencyFS._log_fd, kind[0].encode() * n)  # O_APPEND: atomic across processes
        time.sleep(float(os.environ.get("CAPRAY_BENCH_LATENCY_S", "0.02")) * n)

    def _entry(self, path: str, st: os.stat_result | None = None) -> dict:
        st = st or os.stat(path)
        is_dir = os.path.isdir(path)
        return {"name": path, "type": "directory" if is_dir else "file", "size": 0 if is_dir else st.st_size,
                "mtime": st.st_mtime_ns}

    def ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path)
        if not os.path.isdir(path):
            self._request("LIST")
            if os.path.isfile(path):
                return [self._entry(path)] if detail else [path]
            raise FileNotFoundError(path)
        with os.scandir(path) as it:
            entries = [self._entry(e.path, e.stat()) for e in it]
        self._request("LIST", max(1, math.ceil(len(entries) / PAGE)))
        return entries if detail else [e["name"] for e in entries]

    def find(self, path, maxdepth=None, withdirs=False, detail=False, **kwargs):
        """Every file under `path`, as S3 lists a prefix without a delimiter: 1 LIST per 1,000 keys."""
        path = self._strip_protocol(path)
        found = {}
        for folder, _, files in os.walk(path):
            for name in files:
                full = os.path.join(folder, name)
                found[full] = self._entry(full)
        self._request("LIST", max(1, math.ceil(len(found) / PAGE)))
        return found if detail else sorted(found)

    def info(self, path, **kwargs):
        path = self._strip_protocol(path)
        self._request("HEAD")
        if not os.path.exists(path):
            raise FileNotFoundError(path)
        return self._entry(path)

    def cat_file(self, path, start=None, end=None, **kwargs):
        path = self._strip_protocol(path)
        self._request("GET")
        with open(path, "rb") as fh:
            fh.seek(start or 0)
            return fh.read() if end is None else fh.read(end - (start or 0))

    def pipe_file(self, path, value, **kwargs):
        path = self._strip_protocol(path)
        self._request("PUT")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.part-{os.getpid()}"
        with open(tmp, "wb") as fh:
            fh.write(value)
        os.replace(tmp, path)

    def rm_file(self, path):
        path = self._strip_protocol(path)
        self._request("DELETE")
        os.unlink(path)

    def _rm(self, path):
        self.rm_file(path)

    def mkdir(self, path, create_parents=True, **kwargs):
        pass

    def makedirs(self, path, exist_ok=False):
        pass

    def _open(self, path, mode="rb", **kwargs):
        path = self._strip_protocol(path)
        if "r" in mode:
            self._request("GET")
            return open(path, mode)
        self._request("PUT")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return open(path, mode)

    def invalidate_cache(self, path=None):
        pass


def register() -> None:
    fsspec.register_implementation("latency", LatencyFS, clobber=True)


def driver_requests() -> int:
    return sum(LatencyFS.counts.values())


def all_requests() -> int:
    """Requests of every process so far (driver and Ray workers), from CAPRAY_BENCH_REQUEST_LOG."""
    log = os.environ.get("CAPRAY_BENCH_REQUEST_LOG")
    return os.path.getsize(log) if log and os.path.exists(log) else 0
