"""The output manifest: Parquet rows under `OUT/manifest/`, one per identity once compacted.

Commit records are batched: the write stage commits many identities in one Parquet file,
`OUT/manifest/part-<digest>.parquet`, written atomically *after* every PNG of those identities
(its name is a digest of the run and the identities it holds, so a retried commit overwrites rather
than duplicates). Then each identity's small *state* object is written,
`OUT/manifest/_state/<safe identity>.json`: its input fingerprint, status and failure class and its
outputs. The state is what a rerun's done-check reads (one GET per identity, inside the distributed
listing tasks), so deciding what is done never reads the manifest on the driver. A crash between the
part and the state only makes a rerun redo those identities (same pixels), leaving a superseded row.

`compact` (run at the end of every job and by `capray manifest compact OUT`) rewrites the parts as a
few files of up to `batch.manifest_rows_per_file` rows, keeping each identity's latest row, so the
folder reads as one table with one row per identity: `pyarrow.parquet.read_table("OUT/manifest")`,
`pandas.read_parquet`, Spark, DuckDB (`OUT/manifest/*.parquet`). Paths starting with `_` (the state)
are skipped by those readers.
The columns are derived from `ManifestRow`, which extends the engine's `ProtectionRecord`: a field
is added in one place and appears in the table, the Serve response and the docs' schema alike.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import types
import typing
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from capray.attack.api import ProtectionRecord
from capray.io.storage import arrow_fs, get_fs, join, write_bytes_atomic

MANIFEST_DIR = "manifest"
STATE_DIR = "_state"
STATUS_OK, STATUS_FAILED = "ok", "failed"
FAILURE_INPUT, FAILURE_TRANSIENT = "input", "transient"
Status = Literal["ok", "failed"]
FailureClass = Literal["input", "transient"]
PART_PREFIX, COMPACT_PREFIX = "part-", "compact-"


class ManifestRow(ProtectionRecord):
    """One identity's row: the engine's `ProtectionRecord` plus what the batch job adds around it."""

    safe_name: str = Field(description="the identity's output folder name")
    status: Status
    error: str | None = None
    input_uris: list[str] = Field(default_factory=list)
    output_uris: list[str] = Field(default_factory=list)
    num_photos: int | None = None
    seconds: float | None = Field(None, description="decode to commit")
    attempts: int | None = None
    finished_at: str | None = Field(None, description="UTC, microseconds: the latest row of an identity wins")
    failure_class: FailureClass | None = Field(
        None, description="input: the photos/name are at fault, not retried until the input changes; "
                          "transient: engine or infrastructure, retried by the next run")
    input_fingerprint: str | None = Field(None, description="digest of input URIs, sizes and ETags/mtimes")
    removed_output_uris: list[str] = Field(
        default_factory=list, description="earlier outputs deleted because their source is gone or changed")


class IdentityState(BaseModel):
    """What the done-check needs about an identity's last commit (`OUT/manifest/_state/<safe>.json`)."""

    identity: str
    status: Status
    failure_class: FailureClass | None = None
    fingerprint: str | None = None
    published: list[tuple[str, str]] = Field(
        default_factory=list, description="(input photo stamp uri|size|version, output URI) of what is published")
    finished_at: str | None = None

    def is_done(self, fingerprint: str) -> bool:
        """Skip on rerun: ok, or failed for its input, with the same input as now."""
        return self.fingerprint == fingerprint and (
            self.status == STATUS_OK or self.failure_class == FAILURE_INPUT)


LEADING_COLUMNS = ("identity", "safe_name", "status", "error")


def _arrow_type(annotation: Any) -> pa.DataType:
    """pydantic field annotation → Arrow type (Optional[X] is X: every column is nullable)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return _arrow_type(args[0])
    if origin is list:
        return pa.list_(_arrow_type(args[0]))
    if origin is Literal:
        return pa.string()
    return {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}[annotation]


def _schema_of(model: type[BaseModel]) -> pa.Schema:
    names = list(LEADING_COLUMNS) + [n for n in model.model_fields if n not in LEADING_COLUMNS]
    return pa.schema([(n, _arrow_type(model.model_fields[n].annotation)) for n in names])


SCHEMA = _schema_of(ManifestRow)


def to_table(rows: list[ManifestRow | dict[str, Any]]) -> pa.Table:
    """Rows (missing fields = null) → a table with exactly the manifest schema."""
    dicts = [row.model_dump() if isinstance(row, BaseModel) else row for row in rows]
    return pa.Table.from_pylist([{name: row.get(name) for name in SCHEMA.names} for row in dicts], schema=SCHEMA)


def manifest_path(output: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    return get_fs(join(output, MANIFEST_DIR), storage_options)


def part_name(run_id: str, identities: list[str]) -> str:
    """Deterministic for one commit of one run: a retried commit task overwrites its own file.
    The row count is in the name, so compaction sizes its buckets without opening a file."""
    digest = hashlib.sha256("\x00".join([run_id, *identities]).encode("utf-8", "surrogatepass")).hexdigest()
    return f"{PART_PREFIX}{digest[:24]}-n{len(identities)}.parquet"


def rows_in(file_name: str) -> int | None:
    """The row count a commit or compacted file's name carries (None for other files)."""
    stem = posixpath.basename(file_name).rsplit(".", 1)[0]
    count = stem.rsplit("-n", 1)[-1] if "-n" in stem else ""
    return int(count) if count.isdigit() else None


def write_records(output: str, run_id: str, rows: list[ManifestRow], storage_options: dict[str, Any] | None) -> str:
    """Commit many identities' rows in one Parquet file, atomically; returns its URI."""
    buf = io.BytesIO()
    pq.write_table(to_table(rows), buf)
    uri = join(output, MANIFEST_DIR, part_name(run_id, [r.identity for r in rows]))
    fs, path = get_fs(uri, storage_options)
    write_bytes_atomic(fs, path, buf.getvalue())
    return uri


def state_uri(output: str, safe: str) -> str:
    return join(output, MANIFEST_DIR, STATE_DIR, f"{safe}.json")


def write_state(output: str, safe: str, state: IdentityState, storage_options: dict[str, Any] | None) -> None:
    fs, path = get_fs(state_uri(output, safe), storage_options)
    write_bytes_atomic(fs, path, state.model_dump_json().encode())


def read_state(output: str, safe: str, storage_options: dict[str, Any] | None) -> IdentityState | None:
    """The identity's last committed state, or None (never committed, or unreadable: redo it)."""
    fs, path = get_fs(state_uri(output, safe), storage_options)
    try:
        return IdentityState.model_validate_json(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None


def manifest_files(fs: Any, path: str) -> list[str]:
    """Every committed Parquet file of the manifest (parts and compacted files), sorted."""
    fs.invalidate_cache(path)  # fsspec instances are cached per process: list what is there *now*
    if not fs.exists(path):
        return []
    return sorted(f for f in fs.ls(path, detail=False)
                  if posixpath.basename(f).endswith(".parquet") and not posixpath.basename(f).startswith(("_", ".")))


def latest_rows(table: pa.Table) -> pa.Table:
    """One row per identity: its latest (`finished_at`) row. Sorted by identity."""
    if table.num_rows == 0:
        return table
    ordered = table.sort_by([("identity", "ascending"), ("finished_at", "descending")])
    idents = ordered.column("identity").to_pylist()
    keep = [i == 0 or idents[i] != idents[i - 1] for i in range(len(idents))]
    return ordered.filter(pa.array(keep))


def read_manifest(output: str, storage_options: dict[str, Any] | None = None,
                  columns: list[str] | None = None) -> pa.Table:
    """Every identity's latest row, read on this process: for small outputs, tests and summaries."""
    fs, path = manifest_path(output, storage_options)
    files = manifest_files(fs, path)
    if not files:
        return SCHEMA.empty_table().select(columns or SCHEMA.names)
    import pyarrow.dataset as ds

    dataset = ds.dataset(files, schema=SCHEMA, format="parquet", filesystem=arrow_fs(fs))
    needed = None if columns is None else list(dict.fromkeys([*columns, "identity", "finished_at"]))
    table = latest_rows(dataset.to_table(columns=needed))
    return table if columns is None else table.select(columns)


def bucket_of(identity: str, buckets: int) -> int:
    """Stable hash bucket of an identity (compaction's file), the same on every process and run."""
    digest = hashlib.blake2b(identity.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % max(1, buckets)


def compacted_name(generation: str, bucket: int, rows: int) -> str:
    return f"{COMPACT_PREFIX}{generation}-{bucket:05d}-n{rows}.parquet"


def state_of(row: ManifestRow, published: list[tuple[str, str]]) -> IdentityState:
    return IdentityState(identity=row.identity, status=row.status, failure_class=row.failure_class,
                         fingerprint=row.input_fingerprint, published=published, finished_at=row.finished_at)

