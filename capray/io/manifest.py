"""The output manifest: Parquet rows under `OUT/manifest/`, one per identity once compacted.

Commit records are batched: the write stage commits many identities in one Parquet file,
`OUT/manifest/part-<digest>.parquet`, written atomically *after* every PNG of those identities
(its name is a digest of the run and the identities it holds, so a retried commit overwrites rather
than duplicates). Then each identity's small *state* object is written,
`OUT/manifest/_state/<safe identity>.json`: its input fingerprint, status and failure class and its
outputs. The state is what a rerun's done-check reads (one GET per identity, inside the distributed
listing tasks), so deciding what is done never reads the manifest on the driver. A crash between the
part and the state only makes a rerun redo those identities (same pixels), leaving a superseded row.

`compact` (`capray/batch/compact.py`, at the end of every job) folds a run's parts into *delta*
files, sorted by identity; when the deltas pass `batch.manifest_delta_ratio` of the *main* files'
rows (and on `capray manifest compact OUT`), everything is merged into new main files of up to
`batch.manifest_rows_per_file` rows, each a sorted range of identities. `OUT/manifest/_index.json`
names the main and delta files with their identity ranges: the next run's sweep reads only the
files of the range it is at (`capray/batch/sweep.py`), so deciding what changed costs a few GETs per
10,000 identities. The folder reads as one table (`pyarrow.parquet.read_table("OUT/manifest")`,
pandas, Spark, DuckDB on `OUT/manifest/*.parquet`) where an identity may have a row in a main file
and newer ones in deltas: **the latest `finished_at` is its row** (`read_manifest` does that).
The per-step arrays (λ, L_re, distinct candidates per PGD step) are not in these rows: they go to
`OUT/manifest/_steps/` (same identity and `finished_at`), so they do not bloat the table every run
reads. Paths starting with `_` are skipped by those readers.
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
STEPS_DIR = "_steps"
INDEX_FILE = "_index.json"
STATUS_OK, STATUS_FAILED, STATUS_DELETED = "ok", "failed", "deleted"
FAILURE_INPUT, FAILURE_TRANSIENT = "input", "transient"
Status = Literal["ok", "failed", "deleted"]
# What a run did to an ok identity: protected the whole group; protected only its new or replaced photos
# against the published ones held fixed (`batch.on_added_photos: append`); or nothing (only removed photos).
MODE_GROUP, MODE_APPEND, MODE_KEPT = "group", "append", "kept"
ProtectionMode = Literal["group", "append", "kept"]
FailureClass = Literal["input", "transient"]
PART_PREFIX, MAIN_PREFIX, DELTA_PREFIX = "part-", "main-", "delta-"
# Per PGD step, not per identity: kept out of the main table (see the module docstring).
STEP_FIELDS = ("lambda_schedule", "loss_trajectory", "distinct_candidates")


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
        default_factory=list, description="earlier outputs deleted because their source is gone or changed "
        "(for a `deleted` identity: all of them)")
    published_stamps: list[str] = Field(
        default_factory=list, description="input stamps (uri|size|version) of the outputs published after this "
        "row, aligned with published_uris (a failed run keeps earlier outputs whose source is unchanged)")
    published_uris: list[str] = Field(default_factory=list, description="outputs published after this row")
    published_runs: list[str | None] = Field(
        default_factory=list, description="the run that protected each of published_uris (null: before runs "
        "were recorded): with append, a photo keeps the run that first published it")
    run_id: str | None = Field(None, description="the run that wrote this row (OUT/run.json's run_id)")
    protection_mode: ProtectionMode | None = Field(
        None, description="group: the whole group protected together; append: only new or replaced photos, "
        "against the published ones held fixed; kept: nothing to protect (removed photos only)")
    protected_uris: list[str] = Field(default_factory=list, description="outputs this run protected and wrote")
    fixed_uris: list[str] = Field(default_factory=list, description="published outputs this run held fixed "
                                  "(kept byte for byte; in CAP's group as they are)")
    transient_failures: int = Field(0, description="runs in a row this identity failed transiently with this "
                                    "input; at batch.quarantine_after it is quarantined")


class IdentityState(BaseModel):
    """What the done-check needs about an identity's last commit: a row of the main table, or
    `OUT/manifest/_state/<safe>.json` for a processor applied to a caller's Dataset (point lookups)."""

    identity: str
    status: Status
    failure_class: FailureClass | None = None
    fingerprint: str | None = None
    published: list[tuple[str, str]] = Field(
        default_factory=list, description="(input photo stamp uri|size|version, output URI) of what is published")
    published_runs: list[str | None] = Field(default_factory=list, description="aligned with published")
    finished_at: str | None = None
    transient_failures: int = 0

    def is_done(self, fingerprint: str) -> bool:
        """Skip on rerun: ok, or failed for its input, with the same input as now."""
        return self.fingerprint == fingerprint and (
            self.status == STATUS_OK or self.failure_class == FAILURE_INPUT)

    def verdict(self, fingerprint: str, quarantine_after: int, retry_quarantined: bool = False) -> str | None:
        """Why this identity needs no work now ("skipped_ok", "skipped_input", "quarantined"), or None."""
        if self.fingerprint != fingerprint or self.status == STATUS_DELETED:
            return None
        if self.status == STATUS_OK:
            return "skipped_ok"
        if self.failure_class == FAILURE_INPUT:
            return "skipped_input"
        if self.transient_failures >= quarantine_after and not retry_quarantined:
            return "quarantined"
        return None

    @classmethod
    def of_row(cls, row: dict[str, Any]) -> IdentityState:
        """The state a main-table row (a dict with at least STATE_COLUMNS) describes."""
        return cls(identity=row["identity"], status=row["status"], failure_class=row.get("failure_class"),
                   fingerprint=row.get("input_fingerprint"), finished_at=row.get("finished_at"),
                   published=list(zip(row.get("published_stamps") or [], row.get("published_uris") or [])),
                   published_runs=list(row.get("published_runs") or []),
                   transient_failures=row.get("transient_failures") or 0)


# What a sweep reads of the main table to decide what changed (IdentityState.of_row)
STATE_COLUMNS = ["identity", "status", "failure_class", "input_fingerprint", "published_stamps",
                 "published_uris", "published_runs", "transient_failures", "finished_at"]


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


def _schema_of(model: type[BaseModel], names: list[str]) -> pa.Schema:
    return pa.schema([(n, _arrow_type(model.model_fields[n].annotation)) for n in names])


SCHEMA = _schema_of(ManifestRow, list(LEADING_COLUMNS) + [
    n for n in ManifestRow.model_fields if n not in LEADING_COLUMNS and n not in STEP_FIELDS])
STEPS_SCHEMA = _schema_of(ManifestRow, ["identity", "finished_at", *STEP_FIELDS])


def to_table(rows: list[ManifestRow | dict[str, Any]], schema: pa.Schema = SCHEMA) -> pa.Table:
    """Rows (missing fields = null) → a table with exactly `schema` (the main table's by default)."""
    dicts = [row.model_dump() if isinstance(row, BaseModel) else row for row in rows]
    return pa.Table.from_pylist([{name: row.get(name) for name in schema.names} for row in dicts], schema=schema)


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


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_records(output: str, run_id: str, rows: list[ManifestRow], storage_options: dict[str, Any] | None) -> str:
    """Commit many identities' rows in one Parquet file, atomically (their per-step arrays first, in
    `_steps/`, so a committed row always has them); returns the main file's URI."""
    name = part_name(run_id, [r.identity for r in rows])
    steps = [r for r in rows if any(getattr(r, f) for f in STEP_FIELDS)]
    if steps:
        uri = join(output, MANIFEST_DIR, STEPS_DIR, name)
        fs, path = get_fs(uri, storage_options)
        write_bytes_atomic(fs, path, parquet_bytes(to_table(steps, STEPS_SCHEMA)))
    uri = join(output, MANIFEST_DIR, name)
    fs, path = get_fs(uri, storage_options)
    write_bytes_atomic(fs, path, parquet_bytes(to_table(rows)))
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


def remove_state(output: str, safe: str, storage_options: dict[str, Any] | None) -> None:
    fs, path = get_fs(state_uri(output, safe), storage_options)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


class IndexedFile(BaseModel):
    """A main or delta file of the manifest, and the identities it holds (in both sweep orders)."""

    file: str = Field(description="name inside OUT/manifest/")
    rows: int
    bytes: int
    first: str = Field(description="smallest identity")
    last: str = Field(description="largest identity")
    first_folder_key: str = Field(description="smallest identity + '/' (the order a folder listing has)")
    last_folder_key: str


class ManifestIndex(BaseModel):
    """`OUT/manifest/_index.json`: the compacted files a sweep reads (parts newer than it are folded
    into a delta before a sweep starts)."""

    main: list[IndexedFile] = Field(default_factory=list)
    deltas: list[IndexedFile] = Field(default_factory=list)

    @property
    def files(self) -> list[IndexedFile]:
        return self.main + self.deltas


def read_index(output: str, storage_options: dict[str, Any] | None) -> ManifestIndex:
    """The index, or an empty one when there is none yet. An unreadable index raises: guessing would
    redo (or, worse, skip) the whole library."""
    fs, path = get_fs(join(output, MANIFEST_DIR, INDEX_FILE), storage_options)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return ManifestIndex()
    return ManifestIndex.model_validate_json(data)


def write_index(output: str, index: ManifestIndex, storage_options: dict[str, Any] | None) -> int:
    """Write the index atomically; returns its size in bytes."""
    fs, path = get_fs(join(output, MANIFEST_DIR, INDEX_FILE), storage_options)
    data = index.model_dump_json().encode()
    write_bytes_atomic(fs, path, data)
    return len(data)


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
                  columns: list[str] | None = None, *, steps: bool = False) -> pa.Table:
    """Every identity's latest row, read on this process: for small outputs, tests and summaries.

    `steps=True` adds the per-step arrays (STEP_FIELDS) from `_steps/`: the manifest's full record,
    with the columns it had before they moved out of the main table."""
    fs, path = manifest_path(output, storage_options)
    files = manifest_files(fs, path)
    if not files:
        table = SCHEMA.empty_table()
    else:
        import pyarrow.dataset as ds

        dataset = ds.dataset(files, schema=SCHEMA, format="parquet", filesystem=arrow_fs(fs))
        main_columns = None if columns is None else [c for c in columns if c in SCHEMA.names]
        needed = None if main_columns is None else list(dict.fromkeys([*main_columns, "identity", "finished_at"]))
        table = latest_rows(dataset.to_table(columns=needed))
    if steps:
        table = _with_steps(table, fs, posixpath.join(path, STEPS_DIR))
    return table if columns is None else table.select(columns)


def _with_steps(table: pa.Table, fs: Any, steps_path: str) -> pa.Table:
    """`table` with the per-step arrays of each row's commit (matched on identity and finished_at)."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    files = manifest_files(fs, steps_path)
    if files:
        import pyarrow.dataset as ds

        for row in ds.dataset(files, schema=STEPS_SCHEMA, format="parquet", filesystem=arrow_fs(fs)).to_table(
                ).to_pylist():
            found[(row["identity"], row["finished_at"])] = row
    keys = zip(table.column("identity").to_pylist(), table.column("finished_at").to_pylist())
    matched = [found.get(key, {}) for key in keys]
    for name in STEP_FIELDS:
        table = table.append_column(STEPS_SCHEMA.field(name), pa.array([m.get(name) for m in matched],
                                                                         STEPS_SCHEMA.field(name).type))
    return table


def compacted_name(prefix: str, generation: str, first: str, rows: int) -> str:
    """A main or delta file's name: unique per compaction (`generation`) and range (its first identity)."""
    digest = hashlib.sha256(first.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{prefix}{generation}-{digest}-n{rows}.parquet"


def state_of(row: ManifestRow) -> IdentityState:
    return IdentityState.of_row(row.model_dump())

