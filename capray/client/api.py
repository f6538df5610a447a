"""`Client`: submit one person's photos to a capray endpoint, wait for the job, fetch the protected photos.

Retries are safe by construction: every submit carries an Idempotency-Key (and a fixed multipart
boundary, so a retry is byte-for-byte the same request), and the server answers a repeated key with the
job it already made, so a dropped connection or a busy server never runs the GPU work twice.
Paths are relative to the endpoint URL given here (a route prefix may sit in front), never taken from
the server's absolute URLs, which a proxy may have rewritten.
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from capray.client.errors import (
    ApiError,
    CaprayError,
    JobFailed,
    TransportError,
    WaitTimeout,
    error_from_response,
)
from capray.client.results import ProtectedPhoto, ProtectResult
from capray.client.retry import backoff_seconds, retry_after_seconds
from capray.client.uploads import photo_part

API_KEY_ENV = "CAPRAY_API_KEY"
# httpx errors after which the same request may simply be sent again (nothing, or an idempotent thing, happened)
RETRYABLE_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
BUSY_STATUSES = frozenset({429, 503})  # refusals: the server did no work, and says when to come back
GATEWAY_STATUSES = frozenset({502, 504})  # a proxy's answer: safe to repeat only an idempotent request
POLL_FIRST_S, POLL_GROWTH, POLL_MAX_S = 1.0, 1.5, 10.0
MAX_OUTAGE_S = 300.0  # wait() rides out a server that cannot be reached for this long, then gives up


@dataclass
class Job:
    """A submitted job: poll it with `Client.wait(job.job_id)`."""

    job_id: str
    status_url: str | None = None
    retry_after: float | None = None  # the server's hint for the first poll
    replayed: bool = False  # the server already had this Idempotency-Key: this is the job it made then


def _user_agent() -> str:
    try:
        from capray import __version__
    except ImportError:
        __version__ = "dev"
    return f"capray-client/{__version__ or 'dev'}"


def check_url(url: str) -> httpx.URL:
    """The endpoint root as an httpx URL; ValueError for anything but http(s)://host[:port][/prefix]."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ValueError(f"bad URL {url!r}: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"bad URL {url!r}: expected http(s)://host[:port][/prefix]")
    return parsed


class Client:
    """A synchronous client of one capray endpoint; a context manager (or call `close()`).

    `sleep` and `clock` exist so tests can run the retry and polling schedules without waiting.
    """

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None, max_wait_s: float = 3600, retries: int = 5,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic):
        base = check_url(url)
        api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        headers = {"User-Agent": _user_agent()}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.url, self.max_wait_s, self.retries = str(base).rstrip("/"), max_wait_s, retries
        self.has_key = bool(api_key)
        self._sleep, self._clock, self._rng = sleep, clock, random.Random()
        self.http = httpx.Client(base_url=base, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # -- submitting ---------------------------------------------------------------------------------------

    def submit(self, photos: Iterable[Any], identity: str = "user", options: dict | None = None,
               idempotency_key: str | None = None, fixed_jobs: Iterable[str] = ()) -> Job:
        """POST /v1/protect; retried with the same key on dropped connections, timeouts, 503 and 429."""
        key = idempotency_key or str(uuid.uuid4())
        files, data, content_type = self._multipart(photos, identity, options, fixed_jobs)
        response = self._send("POST", "/v1/protect", headers={"Idempotency-Key": key, "Content-Type": content_type},
                              files=files, data=data)
        body = _json(response)
        job_id = body.get("job_id") if isinstance(body, dict) else None
        if not job_id:
            raise CaprayError(f"the server accepted the photos but sent no job_id (HTTP {response.status_code})")
        return Job(job_id=str(job_id), status_url=response.headers.get("Location") or body.get("status_url"),
                   retry_after=retry_after_seconds(response.headers),
                   replayed=response.headers.get("Idempotent-Replayed", "").lower() == "true")

    def protect_sync(self, photos: Iterable[Any], identity: str = "user", options: dict | None = None) -> dict:
        """POST /v1/protect:sync (small requests): the result with base64 photos, in one round trip.

        Not idempotent, so only refusals that did no work (connect failures, 503, 429) are retried.
        """
        files, data, content_type = self._multipart(photos, identity, options)
        response = self._send("POST", "/v1/protect:sync", idempotent=False, headers={"Content-Type": content_type},
                              files=files, data=data)
        return _json(response)

    @staticmethod
    def _multipart(photos: Iterable[Any], identity: str, options: dict | None,
                   fixed_jobs: Iterable[str] = ()) -> tuple[list, dict, str]:
        """(`photo` file parts, the `options` JSON part, the Content-Type): one boundary, so every retry of
        a request is the same bytes. `fixed_jobs`: finished jobs of this key whose protected photos are
        the person's published ones, held fixed (append: only the new photos are protected)."""
        files = [("photo", photo_part(photo, i)) for i, photo in enumerate(photos)]
        fixed = {"fixed_jobs": list(fixed_jobs)} if fixed_jobs else {}
        data = {"options": json.dumps({"identity": identity, "config": options or {}, **fixed})}
        return files, data, f"multipart/form-data; boundary={uuid.uuid4().hex}"

    # -- following a job ----------------------------------------------------------------------------------

    def status(self, job_id: str) -> dict:
        """GET /v1/jobs/{id}: the job's status document."""
        return _json(self._send("GET", _job_path(job_id)))

    def wait(self, job_id: str, *, timeout: float | None = None,
             on_progress: Callable[[dict], None] | None = None) -> dict:
        """Poll until the job is ok (its status is returned) or failed (`JobFailed`), at most `timeout` s.

        The pause between polls is the server's Retry-After, else 1 s growing ×1.5 to 10 s; a server that
        cannot be reached (or answers 5xx) is polled again for up to MAX_OUTAGE_S; `WaitTimeout` at the bound.
        """
        started = self._clock()
        deadline = started + (timeout if timeout is not None else self.max_wait_s)
        interval, outage_since, failures, status = POLL_FIRST_S, None, 0, None
        while True:
            problem: Exception | None = None
            try:
                response = self.http.get(_job_path(job_id))
            except RETRYABLE_ERRORS as exc:
                problem = exc
            else:
                if response.status_code >= 500 or response.status_code == 429:
                    problem = error_from_response(response)
                elif not response.is_success:
                    raise error_from_response(response)  # 404: deleted or expired; 401/403: the key
            if problem is not None:
                outage_since = self._clock() if outage_since is None else outage_since
                if self._clock() - outage_since > MAX_OUTAGE_S:
                    if isinstance(problem, ApiError):
                        raise problem
                    raise _transport_error(problem, f"GET {self.url}{_job_path(job_id)}") from problem
                hint = retry_after_seconds(problem.headers) if isinstance(problem, ApiError) else None
                pause = hint or backoff_seconds(failures, self._rng)
                failures += 1
            else:
                outage_since, failures, status = None, 0, _json(response)
                if on_progress is not None:
                    on_progress(status)
                if status.get("status") == "ok":
                    return status
                if status.get("status") == "failed":
                    raise JobFailed(job_id, str(status.get("error") or "failed (no message)"), status)
                pause = retry_after_seconds(response.headers)
                if pause is None:  # the server's own pace, else ours: 1 s, ×1.5, at most 10 s
                    pause, interval = interval, min(interval * POLL_GROWTH, POLL_MAX_S)
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise WaitTimeout(job_id, self._clock() - started, status)
            self._sleep(min(pause, remaining))

    # -- results ------------------------------------------------------------------------------------------

    def download(self, job_id: str, status: dict | None = None) -> list[ProtectedPhoto]:
        """GET every protected photo of a finished job (its status is fetched when not given)."""
        status = status if status is not None else self.status(job_id)
        if status.get("status") == "failed":
            raise JobFailed(job_id, str(status.get("error") or "failed (no message)"), status)
        if status.get("status") != "ok":
            raise CaprayError(f"job {job_id} has not finished (status {status.get('status')!r})")
        photos = []
        for i, meta in enumerate((status.get("result") or {}).get("photos") or []):
            response = self._send("GET", f"{_job_path(job_id)}/photos/{i}")
            photos.append(ProtectedPhoto.from_result(meta, response.content, response.headers.get("Content-Type", "")))
        return photos

    def download_zip(self, job_id: str, path: str | os.PathLike) -> Path:
        """Stream GET /v1/jobs/{id}/result.zip (every photo and summary.json) into `path`, whole or not at all."""
        path = Path(path)
        partial = path.with_name(path.name + ".part")
        for attempt in range(self.retries + 1):
            try:
                with self.http.stream("GET", f"{_job_path(job_id)}/result.zip") as response:
                    if not response.is_success:
                        response.read()
                        raise error_from_response(response)
                    with partial.open("wb") as out:
                        for chunk in response.iter_bytes(1 << 16):
                            out.write(chunk)
                partial.replace(path)
                return path
            except RETRYABLE_ERRORS as exc:
                if attempt == self.retries:
                    raise _transport_error(exc, f"GET {self.url}{_job_path(job_id)}/result.zip") from exc
                self._sleep(backoff_seconds(attempt, self._rng))
            finally:
                partial.unlink(missing_ok=True)
        raise AssertionError("unreachable")

    def delete(self, job_id: str) -> None:
        """DELETE /v1/jobs/{id}: uploads, results and records go now (a running job is cancelled)."""
        self._send("DELETE", _job_path(job_id), gone_is_done=True)

    def jobs(self, limit: int = 20) -> Iterator[dict]:
        """Every job of this key, newest first, following `next_cursor` page after page."""
        cursor, seen = None, set()
        while True:
            params = {"limit": limit, **({"cursor": cursor} if cursor else {})}
            page = _json(self._send("GET", "/v1/jobs", params=params))
            yield from page.get("jobs") or []
            cursor = page.get("next_cursor")
            if not cursor or cursor in seen:  # a server repeating a cursor must not loop forever
                return
            seen.add(cursor)

    # -- all in one ---------------------------------------------------------------------------------------

    def protect(self, photos: Iterable[Any], identity: str = "user", options: dict | None = None, *,
                delete: bool = False, timeout: float | None = None, on_progress: Callable[[dict], None] | None = None,
                fixed_jobs: Iterable[str] = ()) -> ProtectResult:
        """Submit, wait, download; with `delete`, the server's copy goes once the photos are here (or the job
        failed). A `WaitTimeout` leaves the job running, so `wait(exc.job_id)` can pick it up."""
        job = self.submit(photos, identity, options, fixed_jobs=fixed_jobs)
        try:
            status = self.wait(job.job_id, timeout=timeout, on_progress=on_progress)
            downloaded = self.download(job.job_id, status)
        except JobFailed:
            if delete:
                self._delete_quietly(job.job_id)
            raise
        if delete:
            self.delete(job.job_id)
        record = {k: v for k, v in (status.get("result") or {}).items() if k != "photos"}
        return ProtectResult(job_id=job.job_id, photos=downloaded, record=record, status=status)

    def _delete_quietly(self, job_id: str) -> None:
        try:
            self.delete(job_id)
        except CaprayError:
            pass  # the server's expiry removes it anyway; the job's own error is the one to report

    # -- one request, retried when that is safe -----------------------------------------------------------

    def _send(self, method: str, path: str, *, idempotent: bool = True, gone_is_done: bool = False,
              **kwargs) -> httpx.Response:
        """The response of a successful request; `ApiError` for the server's refusals, `TransportError` when it
        cannot be reached. GET/DELETE and keyed submits are retried on any transient failure; a request that
        is not idempotent only on failures that prove the server did nothing (connect errors, 503, 429).
        `gone_is_done`: a 404 after a retry means the first try did it (a DELETE whose answer was lost).
        """
        retryable = RETRYABLE_ERRORS if idempotent else (httpx.ConnectError, httpx.ConnectTimeout)
        statuses = BUSY_STATUSES | GATEWAY_STATUSES if idempotent else BUSY_STATUSES
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self.http.request(method, path, **kwargs)
            except retryable as exc:
                if last:
                    raise _transport_error(exc, f"{method} {self.url}{path}") from exc
                self._sleep(backoff_seconds(attempt, self._rng))
                continue
            except httpx.TransportError as exc:
                raise _transport_error(exc, f"{method} {self.url}{path}") from exc
            if response.is_success or (gone_is_done and attempt > 0 and response.status_code == 404):
                return response
            if response.status_code in statuses and not last:
                self._sleep(retry_after_seconds(response.headers) or backoff_seconds(attempt, self._rng))
                continue
            raise error_from_response(response)
        raise AssertionError("unreachable")


def protect(url: str, photos: Iterable[Any], identity: str = "user", options: dict | None = None, *,
            api_key: str | None = None, delete: bool = False, timeout: float | None = None,
            on_progress: Callable[[dict], None] | None = None, **client_options) -> ProtectResult:
    """One call for a script: `Client(url, api_key, **client_options).protect(...)`, closed afterwards."""
    with Client(url, api_key, **client_options) as client:
        return client.protect(photos, identity, options, delete=delete, timeout=timeout, on_progress=on_progress)


def _job_path(job_id: str) -> str:
    return f"/v1/jobs/{quote(str(job_id), safe='')}"


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise CaprayError(f"{response.request.method} {response.request.url.path}: HTTP {response.status_code} "
                          f"with a body that is not JSON: {response.text[:200]!r}") from None


def _transport_error(exc: Exception, where: str) -> TransportError:
    return TransportError(f"no answer from {where}: {type(exc).__name__}: {exc or 'connection dropped'}")
