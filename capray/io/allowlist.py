"""Where a catalog may send the job's reads: the input's own bucket (or folder) and what the config adds.

A catalog is data, often built from user input, and every URI in it is read with the job's
credentials. Without a limit a row could read `http://169.254.169.254/…`, `file:///etc/…`, a chained
`zip::s3://…` URL or another tenant's bucket. So a photo URI must lie under an allowed prefix: by
default the catalog's own folder (a shared bucket's other tenants stay out of reach), or a folder
input itself; `batch.allowed_input_prefixes` adds more. Anything else fails its identity (for its
input) with a message that says which URI and how to allow it: in the check stage, before the stat
that fingerprints the photo (a request too), and again where photos are read. Prefixes match whole
path segments.

A local path is checked where it really leads (symbolic links resolved): a link inside an allowed
folder is followed, a link out of them is refused naming its target — an upload holding a link to
another user's photos or to a server file must not get it protected and published.
"""

from __future__ import annotations

import os
import posixpath

from capray.io.storage import normalize_uri


def default_prefix(input_uri: str) -> str:
    """The catalog's own folder (`s3://bucket/tenant-a` for `s3://bucket/tenant-a/catalog.parquet`), or a
    folder input itself: in a bucket other tenants share, a catalog cannot reach their photos by default."""
    from capray.io.discover import is_catalog

    uri = normalize_uri(input_uri)
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
    target = normalize_uri(uri)  # a local path: where its symbolic links lead
    for prefix in prefixes:
        if target == prefix or target.startswith(prefix.rstrip("/") + "/"):
            return None
    linked = "://" not in uri and target != os.path.abspath(os.path.expanduser(uri))
    what = f"{uri!r} is a symbolic link to {target!r}, which is" if linked else f"URI {uri!r} is"
    return (f"{what} outside the allowed input locations ({', '.join(prefixes)}); "
            "add its prefix to batch.allowed_input_prefixes to allow it")


def read_problem(uri: str, prefixes: list[str] | None) -> str | None:
    """Why the photo at `uri` may not be read where it is about to be (`prefixes`: None, not restricted):
    a broken symbolic link, or outside the allowed locations. Protect and evaluate ask it alike."""
    return broken_link(uri) or (uri_problem(uri, prefixes) if prefixes is not None else None)


def broken_link(uri: str) -> str | None:
    """'broken symbolic link …' for a local path whose link leads nowhere, else None."""
    if "://" in uri or not os.path.islink(uri) or os.path.exists(uri):
        return None
    return f"broken symbolic link (to {os.readlink(uri)!r})"
