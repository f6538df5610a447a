"""Find the identities of a job, streamed: a folder/prefix `ROOT/<identity>/<photos>` or catalog file(s).

Nothing here builds a list of the whole library. A sweep walks the library in a fixed order from a
cursor (`iter_folder_groups`, `iter_catalog_sweep`): on S3 one flat ListObjectsV2 page of 1,000 keys
at a time, which carries each photo's size and ETag, so an unchanged night costs one LIST per 1,000
photos and no request per identity; a catalog file is scanned in record batches, all files merged
by identity (`iter_catalog_groups`). `order_key` says where an identity comes in that order.

A catalog (the input list; "manifest" names OUT/manifest/, the output records) is Parquet, CSV or
JSON Lines with one row per photo and columns `identity`, `uri`
(optional `size` and `etag`/`version` spare a HEAD per photo when fingerprinting). The input may be
one file or a glob of such files (`s3://b/export/part-*.parquet`, an export split in parts). Grouping
streams, so it needs **each identity's rows in one file, and every file sorted by identity**
(`ORDER BY identity`); a file
that is not sorted is refused with an error naming the file and the first out-of-order row, before
any of its groups are used. Relative URIs are resolved against the file's own folder; a URI listed
twice for one identity is used once.

In a folder, hidden files (".DS_Store", "._x.jpg") and OS clutter ("Thumbs.db", "desktop.ini") are
skipped; every other file is treated as a photo, so a non-image makes its identity fail with a
message rather than vanish. Files directly under ROOT, and sub-folders inside an identity, belong
to no identity: they are reported as ignored.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from capray.io.storage import is_local, normalize_uri

CATALOG_SUFFIXES = (".parquet", ".csv", ".jsonl", ".ndjson", ".json")
FOLDER_ORDER, CATALOG_ORDER = "folder", "catalog"
JUNK_NAMES = {"thumbs.db", "desktop.ini"}
PAGE_SIZE = 1000  # S3's ListObjectsV2 page; also the unit the driver hands identity names on in
SIZE_COLUMN, VERSION_COLUMNS = "size", ("etag", "e_tag", "version")


@dataclass(frozen=True)
class Photo:
    """One input photo as listed: its URI plus what tells a changed file from an unchanged one."""

    uri: str
    size: int | None = None
    version: str | None = None  # ETag on object stores, mtime locally

    def stamp(self) -> str:
        return f"{self.uri}|{self.size if self.size is not None else ''}|{self.version or ''}"


@dataclass
class IdentityGroup:
    identity: str
    photos: list[Photo]
    ignored: list[str] = field(default_factory=list)
    problem: str | None = None  # an input failure found while listing (an identity split across catalog files)

    @property
    def uris(self) -> list[str]:
        return [p.uri for p in self.photos]


def fingerprint(photos: list[Photo]) -> str:
    """A digest of an identity's input (URIs, sizes, versions): equal exactly when nothing changed."""
    digest = hashlib.sha256()
    for stamp in sorted(p.stamp() for p in photos):
        digest.update(stamp.encode("utf-8", "surrogatepass") + b"\n")
    return digest.hexdigest()[:32]


def order_key(identity: str, order: str) -> str:
    """Where an identity comes in a sweep. An object store lists keys in byte order, so a folder
    input's identities come sorted by `identity + "/"` ("alice-2/…" before "alice/…"); a catalog is
    sorted by identity itself. Python compares str by code point, which is UTF-8 byte order."""
    return identity + "/" if order == FOLDER_ORDER else identity


def in_range(key: str, after: str | None, until: str | None) -> bool:
    """`key` lies in the sweep range (after, until] (None: open end)."""
    return (after is None or key > after) and (until is None or key <= until)


def _is_junk(name: str) -> bool:
    return name.startswith(".") or name.lower() in JUNK_NAMES


def is_junk(name: str) -> bool:
    """Whether a folder listing skips this file name (hidden files, OS clutter); `capray evaluate` lists alike."""
    return _is_junk(name)


def _uri(fs: Any, path: str) -> str:
    return path if is_local(fs) else fs.unstrip_protocol(path)


def is_catalog(uri: str) -> bool:
    """A catalog file or a glob of catalog files (by suffix); anything else is a folder/prefix."""
    return str(uri).rstrip("/").lower().endswith(CATALOG_SUFFIXES)


def _version(entry: dict[str, Any]) -> str | None:
    for key in ("ETag", "etag", "VersionId", "mtime", "LastModified", "last_modified", "created"):
        if entry.get(key) is not None:
            value = entry[key]
            return str(value.isoformat() if hasattr(value, "isoformat") else value).strip('"')
    return None


# -- folders ----------------------------------------------------------------------------------------

def iter_children(fs: Any, path: str) -> Iterator[list[dict[str, Any]]]:
    """Pages of a folder's direct entries ({"name", "type", ...}), streamed where the filesystem can.

    s3fs: ListObjectsV2 pages (1,000 keys each) with no listings cache, so a 10M-prefix root never
    sits in memory. Local disks: `os.scandir` in pages. Other filesystems: one `ls`.
    """
    if hasattr(fs, "_iterdir") and hasattr(fs, "split_path"):  # s3fs
        yield from _iter_s3_pages(fs, path)
    elif is_local(fs):
        yield from _iter_local_pages(path)
    else:
        entries = fs.ls(path, detail=True)
        for start in range(0, len(entries), PAGE_SIZE):
            yield entries[start:start + PAGE_SIZE]


def is_folder(fs: Any, path: str) -> bool:
    """Whether `path` is a folder/prefix (ROOT of a folder input), for one small request at most.

    s3fs's `isdir` lists the whole prefix, delimited, to answer: for a 10M-identity ROOT that is
    10,000 pages on the driver, left in its listings cache. Here one ListObjectsV2 with MaxKeys=1
    decides (a bucket: one that exists is a folder), and nothing is cached.
    """
    if is_local(fs):
        return os.path.isdir(path)
    if not (hasattr(fs, "_call_s3") and hasattr(fs, "split_path")):  # other stores: their own answer
        return fs.isdir(path)
    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(path)
    prefix = key.rstrip("/") + "/" if key else ""
    try:
        out = sync(fs.loop, fs._call_s3, "list_objects_v2", fs.kwargs, Bucket=bucket, Prefix=prefix,
                   Delimiter="/", MaxKeys=1)
    except FileNotFoundError:  # no such bucket
        return False
    return not key or bool(out.get("KeyCount") or out.get("Contents") or out.get("CommonPrefixes"))


def _iter_local_pages(path: str) -> Iterator[list[dict[str, Any]]]:
    page: list[dict[str, Any]] = []
    with os.scandir(path) as it:
        for entry in it:
            page.append({"name": entry.path, "type": "directory" if entry.is_dir() else "file"})
            if len(page) == PAGE_SIZE:
                yield page
                page = []
    if page:
        yield page


def _iter_s3_pages(fs: Any, path: str) -> Iterator[list[dict[str, Any]]]:
    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(path)
    pages = fs._iterdir(bucket, prefix=key.rstrip("/") + "/" if key else "")

    async def next_page():
        page = []
        async for entry in pages:
            page.append(entry)
            if len(page) == PAGE_SIZE:
                break
        return page

    while True:
        page = sync(fs.loop, next_page)
        if not page:
            return
        yield [dict(e, name=e["name"].rstrip("/")) for e in page]


def iter_identity_names(fs: Any, root: str) -> Iterator[tuple[list[str], list[str]]]:
    """(identity names, ignored entry URIs) page by page: identity folders under ROOT, junk skipped."""
    for page in iter_children(fs, root):
        names, ignored = [], []
        for entry in page:
            name = posixpath.basename(entry["name"].rstrip("/"))
            if _is_junk(name):
                continue
            if entry["type"] == "directory":
                names.append(name)
            else:
                ignored.append(_uri(fs, entry["name"]))
        yield names, ignored


def list_photos(fs: Any, root: str, identity: str) -> IdentityGroup:
    """One identity folder's photos (sorted by URI) with size and version; sub-folders are ignored."""
    photos, ignored = [], []
    folder = posixpath.join(root, identity)
    entries = fs.ls(folder, detail=True, refresh=True)
    fs.invalidate_cache(folder)  # fsspec's listings cache would otherwise hold every identity a worker saw
    for entry in entries:
        name = posixpath.basename(entry["name"].rstrip("/"))
        if _is_junk(name):
            continue
        if entry["type"] == "directory":
            ignored.append(_uri(fs, entry["name"]))
            continue
        photos.append(Photo(_uri(fs, entry["name"]), entry.get("size"), _version(entry)))
    return IdentityGroup(identity, sorted(photos, key=lambda p: p.uri), ignored)


def _s3_flat_pages(fs: Any, path: str, start_after: str | None) -> Iterator[list[tuple[str, int, str | None]]]:
    """ListObjectsV2 pages without a delimiter: (path, size, ETag) of every object under `path`, in key order."""
    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(path)
    prefix = key.rstrip("/") + "/" if key else ""
    token = None
    while True:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": PAGE_SIZE}
        if token:
            kwargs["ContinuationToken"] = token
        elif start_after:
            kwargs["StartAfter"] = prefix + start_after
        out = sync(fs.loop, fs._call_s3, "list_objects_v2", fs.kwargs, **kwargs)
        yield [(f"{bucket}/{o['Key']}", o.get("Size"), str(o.get("ETag") or "").strip('"') or None)
               for o in out.get("Contents", [])]
        token = out.get("NextContinuationToken")
        if not out.get("IsTruncated") or not token:
            return


def _local_entries(root: str, after: str | None) -> Iterator[tuple[str, int | None, str | None, bool]]:
    """(path, size, mtime, is_dir) under a local ROOT: identity folders in folder order, one level deep
    (sub-folders are entries, not walked). Local disks list ROOT's names in memory: that is fine there."""
    with os.scandir(root) as it:
        names = []
        for entry in it:
            if entry.is_dir():
                names.append(entry.name)
            else:
                yield entry.path, None, None, False
    for name in sorted(names, key=lambda n: order_key(n, FOLDER_ORDER)):
        if after is not None and order_key(name, FOLDER_ORDER) <= order_key(after, FOLDER_ORDER):
            continue
        folder = os.path.join(root, name)
        yield folder + "/", None, None, True  # the folder itself: an identity even when empty
        try:
            children = sorted(os.scandir(folder), key=lambda e: e.name)
        except FileNotFoundError:  # removed while listing
            continue
        for entry in children:
            if entry.is_dir():  # a symbolic link is listed as what it points at (a link's target is checked
                yield entry.path, None, None, True  # against the allowed roots where it is read)
                continue
            try:
                st = entry.stat()
            except OSError:  # a broken symbolic link: listed, so its identity fails naming it
                yield entry.path, None, None, False
                continue
            yield entry.path, st.st_size, str(st.st_mtime_ns), False


def _flat_entries(fs: Any, path: str, after: str | None) -> Iterator[tuple[str, int | None, str | None, bool]]:
    if is_local(fs):
        yield from _local_entries(path, after)
    elif hasattr(fs, "_call_s3") and hasattr(fs, "split_path"):  # s3fs: pages from where the cursor is
        # keys after every "ROOT/<after>/…" key: "0" is the character right after "/"
        for page in _s3_flat_pages(fs, path, after + "0" if after is not None else None):
            for name, size, etag in page:
                yield name, size, etag, False
    else:  # other stores: one flat listing (`find`), in key order
        for name, info in sorted(fs.find(path, detail=True).items()):
            yield name, info.get("size"), _version(info), info.get("type") == "directory"


def iter_folder_groups(fs: Any, root: str, after: str | None = None, until: str | None = None,
                       on_ignored: Any = None) -> Iterator[IdentityGroup]:
    """ROOT's identities with their photos (sorted by URI), in folder order, from after `after` up
    to and including `until` (identity names; None: from the start / to the end).

    Files directly under ROOT and sub-folders of an identity belong to no identity: `on_ignored(uri)`
    is told each (once per sub-folder); hidden files and OS clutter are skipped."""
    root = root.rstrip("/")
    after_key = order_key(after, FOLDER_ORDER) if after is not None else None
    until_key = order_key(until, FOLDER_ORDER) if until is not None else None
    current: IdentityGroup | None = None
    for name, size, version, is_dir in _flat_entries(fs, root, after):
        rel = name[len(root) + 1:] if name.startswith(root + "/") else name
        identity, sep, rest = rel.partition("/")
        if not sep:  # a file directly under ROOT
            if not _is_junk(identity) and on_ignored is not None:
                on_ignored(_uri(fs, name))
            continue
        if _is_junk(identity) or not in_range(order_key(identity, FOLDER_ORDER), after_key, None):
            continue
        if current is None or identity != current.identity:
            if current is not None:
                current.photos.sort(key=lambda p: p.uri)
                yield current
            if until_key is not None and order_key(identity, FOLDER_ORDER) > until_key:
                return
            current = IdentityGroup(identity, [])
        child, nested, _ = rest.partition("/")
        if not child or _is_junk(child):
            continue
        if nested or is_dir:  # inside a sub-folder: report the sub-folder once
            sub = _uri(fs, f"{root}/{identity}/{child}")
            if sub not in current.ignored:
                current.ignored.append(sub)
                if on_ignored is not None:
                    on_ignored(sub)
            continue
        current.photos.append(Photo(_uri(fs, name), size, version))
    if current is not None:
        current.photos.sort(key=lambda p: p.uri)
        yield current


# -- catalogs --------------------------------------------------------------------------------------

def catalog_files(fs: Any, path: str) -> list[str]:
    """The catalog file, or every file a glob names (`s3://b/export/part-*.parquet`), sorted."""
    if any(ch in path for ch in "*?["):
        return sorted(f for f in fs.glob(path) if f.lower().endswith(CATALOG_SUFFIXES))
    return [path] if fs.isfile(path) else []


def _resolve(base: str, relative: str) -> str:
    """`relative` against the catalog's folder, '..' collapsed, for local paths and URLs alike."""
    if "://" in base:
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, relative))}"
    return posixpath.normpath(posixpath.join(base, relative))


def _dataset(fs: Any, path: str):
    import pyarrow as pa
    import pyarrow.dataset as pads

    from capray.io.storage import arrow_fs

    lower = path.lower()
    if lower.endswith(".parquet"):
        fmt = "parquet"
    elif lower.endswith(".csv"):
        import pyarrow.csv as pacsv

        fmt = pads.CsvFileFormat(convert_options=pacsv.ConvertOptions(
            column_types={"identity": pa.string(), "uri": pa.string(), "etag": pa.string()}))
    else:
        fmt = "json"
    return pads.dataset(path, format=fmt, filesystem=arrow_fs(fs))


def _batches(fs: Any, path: str, uri: str, columns: list[str], after: str | None = None):
    import pyarrow.dataset as pads

    try:
        dataset = _dataset(fs, path)
    except Exception as exc:  # pyarrow raises several types for malformed files
        raise ValueError(f"could not read catalog {uri}: {exc}") from None
    names = dataset.schema.names
    missing = {"identity", "uri"} - set(names)
    if missing:
        raise ValueError(f"catalog {uri} lacks column(s) {sorted(missing)}; needs 'identity' and 'uri'")
    # from a cursor: Parquet row groups wholly before it are skipped by their statistics
    where = pads.field("identity").cast("string") > after if after is not None else None
    try:
        yield from dataset.to_batches(columns=[c for c in columns if c in names], filter=where)
    except Exception as exc:
        raise ValueError(f"could not read catalog {uri}: {exc}") from None


def check_sorted(fs: Any, path: str, uri: str) -> None:
    """Refuse a catalog file whose rows are not sorted by identity (streamed grouping needs it)."""
    previous, row = None, 0
    for batch in _batches(fs, path, uri, ["identity"]):
        for ident in batch.column(0).to_pylist():
            ident = "" if ident is None else str(ident)
            if previous is not None and ident < previous:
                raise ValueError(f"catalog {uri} is not sorted by identity: row {row + 1} has {ident!r} after "
                                 f"{previous!r}; write it with ORDER BY identity (each identity in one file)")
            previous, row = ident, row + 1


def iter_catalog_groups(fs: Any, path: str, after: str | None = None) -> Iterator[IdentityGroup]:
    """The identity groups of one catalog file, in file order, holding one group at a time; with
    `after`, only identities sorting after it."""
    uri = _uri(fs, path)
    check_sorted(fs, path, uri)
    base = posixpath.dirname(uri)
    current: str | None = None
    photos: dict[str, Photo] = {}
    for batch in _batches(fs, path, uri, ["identity", "uri", SIZE_COLUMN, *VERSION_COLUMNS], after):
        cols = {name: batch.column(name).to_pylist() for name in batch.schema.names}
        versions = next((cols[c] for c in VERSION_COLUMNS if c in cols), [None] * batch.num_rows)
        sizes = cols.get(SIZE_COLUMN, [None] * batch.num_rows)
        for ident, photo, size, version in zip(cols["identity"], cols["uri"], sizes, versions):
            ident = "" if ident is None else str(ident)
            if ident != current:
                if current is not None:
                    yield IdentityGroup(current, sorted(photos.values(), key=lambda p: p.uri))
                current, photos = ident, {}
            if photo is None or str(photo).strip() == "":
                photos.setdefault("", Photo(""))
                continue
            photo = str(photo)
            if "://" not in photo and not photo.startswith("/"):
                photo = _resolve(base, photo)
            photo = normalize_uri(photo)
            photos[photo] = Photo(photo, int(size) if size is not None else None,
                                  str(version).strip('"') if version is not None else None)
    if current is not None:
        yield IdentityGroup(current, sorted(photos.values(), key=lambda p: p.uri))


def iter_catalog_sweep(fs_for: Any, uris: list[str], after: str | None = None, until: str | None = None,
                       on_error: Any = None) -> Iterator[IdentityGroup]:
    """Every catalog file's groups merged into one stream sorted by identity, in (after, until].

    An identity must be in one file: one found in two (the boundary of a size-split export) comes out
    once, with all its photos and a `problem` naming both files, so it fails for its input rather
    than have its halves overwrite each other's outputs. A file that cannot be used (unreadable, not
    sorted) is left out and passed to `on_error(uri, message)`; the others go on."""
    import heapq

    def stream(index: int, uri: str):
        fs, path = fs_for(uri)
        groups = iter_catalog_groups(fs, path, after)
        try:
            first = next(groups, None)  # the sortedness check runs here, before any group is used
        except (ValueError, OSError) as exc:
            if on_error is None:
                raise
            on_error(uri, str(exc))
            return
        if first is not None:
            yield first.identity, index, first
            for group in groups:
                yield group.identity, index, group

    merged = heapq.merge(*(stream(i, u) for i, u in enumerate(uris)), key=lambda item: (item[0], item[1]))
    pending: list[tuple[str, int, IdentityGroup]] = []
    for item in merged:
        if pending and item[0] != pending[0][0]:
            yield _one_group(pending, uris)
            pending = []
        if until is not None and item[0] > until:
            return
        pending.append(item)
    if pending:
        yield _one_group(pending, uris)


def _one_group(items: list[tuple[str, int, IdentityGroup]], uris: list[str]) -> IdentityGroup:
    if len(items) == 1:
        return items[0][2]
    photos = {p.uri: p for _, _, g in items for p in g.photos}
    files = " and ".join(uris[i] for _, i, _ in items)
    return IdentityGroup(items[0][0], sorted(photos.values(), key=lambda p: p.uri),
                         problem=f"identity {items[0][0]!r} is in more than one catalog file ({files}); each "
                                 "identity's rows must be in one file: nothing was protected for it")


def stat_photos(fs_for: Any, group: IdentityGroup) -> IdentityGroup:
    """Fill in size/version of catalog photos that did not carry them (one HEAD each, in a worker)."""
    photos = []
    for photo in group.photos:
        if photo.uri and photo.size is None and photo.version is None:
            try:
                fs, path = fs_for(photo.uri)
                info = fs.info(path)
                photo = Photo(photo.uri, info.get("size"), _version(info))
            except (OSError, ValueError):
                pass  # decode reports the unreadable file; the fingerprint keeps the bare URI
        photos.append(photo)
    return IdentityGroup(group.identity, photos, group.ignored, group.problem)
