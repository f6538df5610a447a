"""The output manifest: one Parquet row per identity under `OUT/manifest/`.

Each identity's row is its own small Parquet file, `OUT/manifest/<safe identity>.parquet`, written
atomically *after* the identity's PNGs. That file is the commit record: an identity is done exactly
when its part exists, a rerun overwrites (never duplicates) it, and readers treat the folder as one
table (`pyarrow.parquet.read_table("OUT/manifest")`, `pandas.read_parquet`, Spark, DuckDB…).
The columns are derived from `ManifestRow`, which extends the engine's `ProtectionRecord`: a field
is added in one place and appears in the table, the Serve response and the docs' schema alike.
"""

from __future__ import annotations

import io
import types
import typing
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from capray.attack.api import ProtectionRecord

from capray.io.storage import get_fs, join, write_bytes_atomic

MANIFEST_DIR = "manifest"
STATUS_OK, STATUS_FAILED = "ok", "failed"


class ManifestRow(ProtectionRecord):
    """One identity's row: the engine's `ProtectionRecord` plus what the batch job adds around it."""

    identity: str
    safe_name: str = Field(description="the identity's output folder name")
    status: Literal["ok", "failed"]
    error: str | None = None
    input_uris: list[str] = Field(default_factory=list)
    output_uris: list[str] = Field(default_factory=list)
    num_photos: int | None = None
    seconds: float | None = Field(None, description="decode to commit")
    attempts: int | None = None
    finished_at: str | None = None


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


def part_uri(output: str, safe: str) -> str:
    return join(output, MANIFEST_DIR, f"{safe}.parquet")


def write_part(output: str, safe: str, row: ManifestRow | dict[str, Any], storage_options: dict[str, Any] | None) -> str:
    """Write one identity's row atomically; returns its URI."""
    buf = io.BytesIO()
    pq.write_table(to_table([row]), buf)
    uri = part_uri(output, safe)
    fs, path = get_fs(uri, storage_options)
    write_bytes_atomic(fs, path, buf.getvalue())
    return uri


def read_manifest(output: str, storage_options: dict[str, Any] | None = None,
                  columns: list[str] | None = None) -> pa.Table:
    """All committed rows (an empty table when nothing is committed yet)."""
    fs, path = get_fs(join(output, MANIFEST_DIR), storage_options)
    fs.invalidate_cache(path)  # fsspec instances are cached per process: list what is there *now*
    files = [f for f in fs.find(path) if f.endswith(".parquet")] if fs.exists(path) else []
    if not files:
        return SCHEMA.empty_table().select(columns or SCHEMA.names)
    import pyarrow.dataset as ds

    dataset = ds.dataset(sorted(files), schema=SCHEMA, format="parquet", filesystem=_arrow_fs(fs))
    return dataset.to_table(columns=columns)


def done_identities(output: str, storage_options: dict[str, Any] | None = None) -> set[str]:
    """Identities whose committed row says `ok`: a rerun skips exactly these."""
    table = read_manifest(output, storage_options, columns=["identity", "status"])
    return {i for i, s in zip(table.column("identity").to_pylist(), table.column("status").to_pylist())
            if s == STATUS_OK}


def _arrow_fs(fs: Any):
    from pyarrow.fs import FSSpecHandler, LocalFileSystem, PyFileSystem

    from capray.io.storage import is_local

    return LocalFileSystem() if is_local(fs) else PyFileSystem(FSSpecHandler(fs))
