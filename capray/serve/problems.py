"""Every refusal the endpoint gives, as an RFC 9457 problem: one stable `type` per kind of refusal.

A client (the page, `capray.client`, a platform's integration) branches on `type`, never on the wording
of `detail`, which names the limit and may change. The catalogue below is the one place a refusal's
HTTP status and title are defined; `docs/endpoint.md` and the OpenAPI document list it.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

TYPE_PREFIX = "urn:capray:problem:"
MEDIA_TYPE = "application/problem+json"

# slug: (HTTP status, title). A new refusal gets a new slug; an existing slug never changes meaning.
PROBLEMS: dict[str, tuple[int, str]] = {
    "unauthorized": (401, "An API key is required"),
    "invalid-key": (401, "The API key was not accepted"),
    "forbidden": (403, "This API key may not do this"),
    "keys-unavailable": (503, "The server cannot read its API keys"),
    "server-busy": (503, "The server is busy"),
    "too-many-jobs": (429, "Too many jobs in progress for this API key"),
    "rate-limited": (429, "Too many bytes sent by this API key"),
    "body-too-large": (413, "The request body is too large"),
    "body-too-slow": (408, "The request body arrived too slowly"),
    "too-many-photos": (413, "Too many photos"),
    "photo-too-large": (413, "A photo is too large"),
    "too-many-pixels": (413, "The photos have too many pixels"),
    "unsupported-format": (415, "A photo's format is not accepted"),
    "unsupported-media-type": (415, "The body must be JSON or multipart"),
    "invalid-photo": (422, "A photo cannot be used"),
    "invalid-input": (422, "The photos cannot be protected"),
    "no-photos": (422, "No photos"),
    "malformed-request": (422, "The request is malformed"),
    "config-not-settable": (422, "A setting is the server's own"),
    "invalid-config": (422, "The settings are invalid"),
    "over-server-limits": (422, "The settings ask for more than this server allows"),
    "idempotency-key-reused": (422, "This Idempotency-Key was used for another request"),
    "not-found": (404, "Not found"),
    "not-finished": (409, "The job has no result"),
    "method-not-allowed": (405, "Method not allowed"),
    "timed-out": (504, "Protection timed out"),
    "internal": (500, "Internal error"),
}


def problem_type(slug: str) -> str:
    return TYPE_PREFIX + slug


class RequestError(Exception):
    """A refused request: a problem `slug` (its status comes from the catalogue), the specific message,
    headers (Retry-After, WWW-Authenticate…) and extension members naming what is wrong (photo, name…)."""

    def __init__(self, slug: str, message: str, headers: dict[str, str] | None = None, **context: Any):
        if slug not in PROBLEMS:
            raise KeyError(f"unknown problem type {slug!r}")
        super().__init__(message)
        self.slug, self.detail, self.headers, self.context = slug, message, headers, context
        self.status, self.title = PROBLEMS[slug]

    def body(self, instance: str | None = None) -> dict[str, Any]:
        body = {"type": problem_type(self.slug), "title": self.title, "status": self.status, "detail": self.detail}
        if instance:
            body["instance"] = instance
        return {**body, **{k: v for k, v in self.context.items() if k not in body}}

    def encoded(self, instance: str | None = None) -> bytes:
        return json.dumps(self.body(instance)).encode()


class Problem(BaseModel):
    """RFC 9457 problem details (the body of every error response)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description=f"{TYPE_PREFIX}<slug>: one of " + ", ".join(PROBLEMS),
                      examples=[problem_type("too-many-photos")])
    title: str = Field(description="the problem type's fixed summary")
    status: int
    detail: str = Field(description="what exactly was refused, naming the limit (wording may change: branch on type)")
    instance: str | None = Field(None, description="the request path")


def responses(*slugs: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these refusals: one entry per status, listing the problem types it carries."""
    by_status: dict[int, list[str]] = {}
    for slug in slugs:
        by_status.setdefault(PROBLEMS[slug][0], []).append(slug)
    return {status: {"description": "; ".join(f"`{s}`: {PROBLEMS[s][1]}" for s in found),
                     "content": {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
            for status, found in sorted(by_status.items())}
