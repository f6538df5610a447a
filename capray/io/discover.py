"""Find the identity groups of a job: a folder/prefix `ROOT/<identity>/<photos>` or a manifest file.

A manifest is Parquet, CSV or JSON Lines with one row per photo and columns `identity`, `uri`;
relative URIs are resolved against the manifest's own folder; a URI listed twice for one identity
is used once. Groups come out sorted by identity,
photos sorted by URI, so a job's plan is the same on every run. In a folder, hidden files
(".DS_Store", "._x.jpg") and OS clutter ("Thumbs.db", "desktop.ini") are skipped; every other file
is treated as a photo, so a non-image makes its identity fail with a message rather than vanish.
Files directly under ROOT belong to no identity: they are listed in `ignored` (and in run.json).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any

from capray.io.storage import get_fs, is_local, normalize_uri

MANIFEST_SUFFIXES = (".parquet", ".csv", ".jsonl", ".ndjson", ".json")
JUNK_NAMES = {"thumbs.db", "desktop.ini"}


@dataclass
class IdentityGroup:
    identity: str
    uris: list[str]


@dataclass
class Discovery:
    groups: list[IdentityGroup]
    kind: str  # "folder" or "manifest"
    root: str  # the folder, or the manifest's folder
    ignored: list[str] = field(default_factory=list)


def _is_junk(name: str) -> bool:
    return name.startswith(".") or name.lower() in JUNK_NAMES


def is_junk(name: str) -> bool:
    """Whether a folder listing skips this file name (hidden files, OS clutter); `capray evaluate` lists alike."""
    return _is_junk(name)


def _uri(fs: Any, path: str) -> str:
    return path if is_local(fs) else fs.unstrip_protocol(path)


def is_manifest(uri: str) -> bool:
    return normalize_uri(uri).lower().endswith(MANIFEST_SUFFIXES)


def discover(uri: str, storage_options: dict[str, Any] | None = None) -> Discovery:
    """Groups from a folder or a manifest; raises FileNotFoundError / ValueError for unusable input."""
    uri = normalize_uri(uri)
    fs, path = get_fs(uri, storage_options)
    fs.invalidate_cache(path)  # a rerun must see the input as it is now, not a cached listing
    if is_manifest(uri):
        if not fs.isfile(path):
            raise FileNotFoundError(f"manifest {uri} not found")
        return _from_manifest(uri, fs, path)
    if not fs.isdir(path):
        raise FileNotFoundError(f"input {uri} is neither a folder/prefix nor a manifest "
                                f"({', '.join(MANIFEST_SUFFIXES)})")
    return _from_folder(uri, fs, path)


def _from_folder(uri: str, fs: Any, path: str) -> Discovery:
    groups, ignored = [], []
    for entry in sorted(fs.ls(path, detail=True), key=lambda e: e["name"]):
        name = posixpath.basename(entry["name"].rstrip("/"))
        if _is_junk(name):
            continue
        if entry["type"] != "directory":
            ignored.append(_uri(fs, entry["name"]))
            continue
        photos = []
        for sub in sorted(fs.ls(entry["name"], detail=True), key=lambda e: e["name"]):
            sub_name = posixpath.basename(sub["name"].rstrip("/"))
            if _is_junk(sub_name):
                continue
            if sub["type"] == "directory":
                ignored.append(_uri(fs, sub["name"]))
                continue
            photos.append(_uri(fs, sub["name"]))
        groups.append(IdentityGroup(name, photos))
    return Discovery(groups, "folder", uri, ignored)


def _resolve(base: str, relative: str) -> str:
    """`relative` against the manifest's folder, '..' collapsed, for local paths and URLs alike."""
    if "://" in base:
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, relative))}"
    return posixpath.normpath(posixpath.join(base, relative))


def _read_table(fs: Any, path: str):
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    lower = path.lower()
    with fs.open(path, "rb") as fh:
        if lower.endswith(".parquet"):
            return pq.read_table(fh)
        if lower.endswith(".csv"):
            opts = pacsv.ConvertOptions(column_types={"identity": "string", "uri": "string"})
            return pacsv.read_csv(fh, convert_options=opts)
        return pajson.read_json(fh)


def _from_manifest(uri: str, fs: Any, path: str) -> Discovery:
    try:
        table = _read_table(fs, path)
    except Exception as exc:  # pyarrow raises several types for malformed files
        raise ValueError(f"could not read manifest {uri}: {exc}") from None
    missing = {"identity", "uri"} - set(table.column_names)
    if missing:
        raise ValueError(f"manifest {uri} lacks column(s) {sorted(missing)}; needs 'identity' and 'uri'")
    base = posixpath.dirname(uri)
    by_identity: dict[str, list[str]] = {}
    for ident, photo in zip(table.column("identity").to_pylist(), table.column("uri").to_pylist()):
        ident = "" if ident is None else str(ident)
        if photo is None or str(photo).strip() == "":
            by_identity.setdefault(ident, []).append("")
            continue
        photo = str(photo)
        if "://" not in photo and not photo.startswith("/"):
            photo = _resolve(base, photo)
        by_identity.setdefault(ident, []).append(normalize_uri(photo))
    groups = [IdentityGroup(k, sorted(set(v)))  # a photo listed twice is protected once
              for k, v in sorted(by_identity.items())]
    return Discovery(groups, "manifest", base)
