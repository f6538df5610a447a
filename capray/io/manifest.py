"""The output manifest: one Parquet row per identity under `OUT/manifest/`.

Each identity's row is its own small Parquet file, `OUT/manifest/<safe identity>.parquet`, written
atomically *after* the identity's PNGs. That file is the commit record: an identity is done exactly
when its part exists, a rerun overwrites (never duplicates) it, and readers treat the folder as one
table (`pyarrow.parquet.read_table("OUT/manifest")`, `pandas.read_parquet`, Spark, DuckDB…).
"""

from __future__ import annotations

import io
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from capray.io.storage import get_fs, join, write_bytes_atomic

MANIFEST_DIR = "manifest"
STATUS_OK, STATUS_FAILED = "ok", "failed"

SCHEMA = pa.schema([
    ("identity", pa.string()),
    ("safe_name", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("input_uris", pa.list_(pa.string())),
    ("output_uris", pa.list_(pa.string())),
    ("num_photos", pa.int32()),
    ("method", pa.string()),
    ("cap_enabled", pa.bool_()),
    ("lambda_schedule", pa.list_(pa.float64())),
    ("loss_trajectory", pa.list_(pa.float64())),
    ("distinct_candidates", pa.list_(pa.int32())),
    ("pgd_steps", pa.int32()),
    ("linf_255", pa.list_(pa.float64())),
    ("linf_255_max", pa.float64()),
    ("psnr", pa.list_(pa.float64())),
    ("ssim", pa.list_(pa.float64())),
    ("consistency_before", pa.float64()),
    ("consistency_after", pa.float64()),
    ("surrogate_mode", pa.string()),
    ("notes", pa.list_(pa.string())),
    ("seconds", pa.float64()),
    ("engine_seconds", pa.float64()),
    ("attempts", pa.int32()),
    ("config_hash", pa.string()),
    ("model_id", pa.string()),
    ("seed", pa.int64()),
    ("capray_version", pa.string()),
    ("finished_at", pa.string()),
])


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (missing fields = null) → a table with exactly the manifest schema."""
    return pa.Table.from_pylist([{name: row.get(name) for name in SCHEMA.names} for row in rows], schema=SCHEMA)


def part_uri(output: str, safe: str) -> str:
    return join(output, MANIFEST_DIR, f"{safe}.parquet")


def write_part(output: str, safe: str, row: dict[str, Any], storage_options: dict[str, Any] | None) -> str:
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
