"""Where a catalog may send the job's reads: the input's own bucket (or folder) and what the config adds.

A catalog is data, often built from user input, and every URI in it is read with the job's
credentials. Without a limit a row could read `http://169.254.169.254/…`, `file:///etc/…`, a chained
`zip::s3://…` URL or another tenant's bucket. So a photo URI must lie under an allowed prefix: by
default the input's own `scheme://bucket/` for an object store, or the catalog's own folder for a
local catalog; `batch.allowed_input_prefixes` adds more. Anything else fails its identity (for its
input) with a message that says which URI and how to allow it: in the check stage, before the stat
that fingerprints the photo (a request too), and again where photos are read. Prefixes match whole
path segments.
"""

from __future__ import annotations

import posixpath

from capray.io.storage import normalize_uri


def default_prefix(input_uri: str) -> str:
    """The input's own bucket (`s3://bucket`), or for a local input its folder (a catalog's parent)."""
    uri = normalize_uri(input_uri)
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{rest.split('/', 1)[0]}"
    from capray.io.discover import is_catalog

    return posixpath.dirname(uri) if is_catalog(uri) else uri


def allowed_prefixes(input_uri: str, extra: list[str]) -> list[str]:
    return [default_prefix(input_uri)] + [normalize_uri(p) for p in extra]


def uri_problem(uri: str, prefixes: list[str]) -> str | None:
    """Why `uri` may not be read, or None when it lies under one of `prefixes`."""
    if "::" in uri:
        return f"chained URL {uri!r} is not allowed in a catalog"
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        if any(part in (".", "..") for part in rest.split("/")):
            return f"URI {uri!r} contains '.' or '..' segments"
        if scheme == "file":
            return f"URI {uri!r}: file:// URLs are not allowed in a catalog (use a relative or absolute path)"
    target = normalize_uri(uri)
    for prefix in prefixes:
        if target == prefix or target.startswith(prefix.rstrip("/") + "/"):
            return None
    return (f"URI {uri!r} is outside the allowed input locations ({', '.join(prefixes)}); "
            "add its prefix to batch.allowed_input_prefixes to allow it")
