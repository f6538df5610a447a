"""What can go wrong talking to a capray endpoint, one class per thing a caller would handle differently.

The server answers errors as RFC 9457 problem documents (`type: urn:capray:problem:<slug>`); `ApiError`
keeps every member so a caller can read the extensions (`photo`, `name`, `errors`…), and prints as
`<slug> (<status>): <detail>`, the line a user needs.
"""

from __future__ import annotations

from typing import Any

PROBLEM_PREFIX = "urn:capray:problem:"


class CaprayError(Exception):
    """Anything `capray.client` raises on purpose."""


class TransportError(CaprayError):
    """The server could not be reached (or the connection kept dropping) after the retries."""


class ApiError(CaprayError):
    """The server refused or failed a request; built from its problem+json body."""

    def __init__(self, status: int, type: str, title: str, detail: str, body: Any = None,
                 headers: dict[str, str] | None = None):
        self.status, self.type, self.title, self.detail = status, type, title, detail
        self.body, self.headers = body, dict(headers or {})
        super().__init__(str(self))

    @property
    def slug(self) -> str:
        """The problem's short name (`too-many-photos`), or the whole type when it is not a capray one."""
        return self.type.removeprefix(PROBLEM_PREFIX)

    def __str__(self) -> str:
        reason = self.detail or self.title
        if self.type == "about:blank":
            return f"HTTP {self.status}: {reason}" if reason else f"HTTP {self.status}"
        specifics = self.errors()
        return f"{self.slug} ({self.status}): {reason}" + (f" ({'; '.join(specifics)})" if specifics else "")

    def errors(self, limit: int = 3) -> list[str]:
        """The problem's `errors` member as `where: what` lines (a config refusal names each bad key there)."""
        raw = self.body.get("errors") if isinstance(self.body, dict) else None
        out = []
        for item in raw[:limit] if isinstance(raw, list) else []:
            if isinstance(item, dict):
                loc = item.get("loc")
                loc = ".".join(map(str, loc)) if isinstance(loc, list | tuple) else str(loc or "")
                out.append(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg", "")))
            else:
                out.append(str(item))
        return out


class AuthenticationError(ApiError):
    """401: no key, or one the server does not know."""


class PermissionDenied(ApiError):
    """403: a known key without the right for this route."""


class NotFound(ApiError):
    """404: no such job (never existed, deleted, expired or another key's), photo or route."""


class RequestRefused(ApiError):
    """Another 4xx: the request itself cannot work as sent (too many photos, bad config…); retrying won't help."""


class ServerBusy(ApiError):
    """503/429 still answered after the client's retries; `retry_after` is the server's last hint (seconds)."""

    @property
    def retry_after(self) -> float | None:
        from capray.client.retry import retry_after_seconds

        return retry_after_seconds(self.headers)


class JobFailed(CaprayError):
    """The job ran and failed; `error` is the server's message, `status` its whole status document."""

    def __init__(self, job_id: str, error: str, status: dict | None = None):
        self.job_id, self.error, self.status = job_id, error, status or {}
        super().__init__(f"job {job_id} failed: {error}")


class WaitTimeout(CaprayError):
    """The job was still pending at the wait's bound; it keeps running on the server (`wait` again)."""

    def __init__(self, job_id: str, waited_s: float, status: dict | None = None):
        self.job_id, self.waited_s, self.status = job_id, waited_s, status or {}
        progress = (status or {}).get("progress") or {}
        steps = (f", step {progress['steps_done']}/{progress['steps_total']}"
                 if {"steps_done", "steps_total"} <= progress.keys() else "")
        super().__init__(f"job {job_id} still pending after {waited_s:.0f} s{steps}")


def error_from_response(response) -> ApiError:
    """The exception for an httpx error response, tolerating a body that is not a problem document."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        type_ = str(body.get("type") or "about:blank")
        title = str(body.get("title") or response.reason_phrase or "")
        detail = body.get("detail")
        detail = str(detail) if detail is not None else ""
    else:
        body = response.text
        type_, title, detail = "about:blank", response.reason_phrase or "", " ".join(body.split())[:300]
    return _error_class(status)(status, type_, title, detail, body, dict(response.headers))


def _error_class(status: int) -> type[ApiError]:
    if status in (429, 503):
        return ServerBusy
    return {401: AuthenticationError, 403: PermissionDenied, 404: NotFound}.get(
        status, RequestRefused if 400 <= status < 500 else ApiError)
