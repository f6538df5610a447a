"""Compaction of `OUT/manifest/`: many small commit files → a few files, one row per identity.

Rows are read with Ray Data, grouped by a stable hash bucket of the identity (so every row of an
identity meets in one group, whichever files it was in) and each bucket is written as one file
holding the latest row of each of its identities, sorted by identity. Only then, and only when the
buckets together took in every row the files hold, are the files that were read deleted: a block
that Ray Data dropped or a bucket that was never written stops the compaction with the files kept.
Buckets are sized by `batch.manifest_rows_per_file`, so a finished 10M-identity run reads as ~1,000
files. Idempotent: compacting a compacted folder gives the same rows. A crash before the deletes
leaves the same rows twice (the older files are deleted by the next compaction; readers that need
one row per identity meanwhile keep the latest `finished_at`, as `read_manifest` does).
Runs on the cluster, not the driver: the driver holds only the list of file names.
"""

from __future__ import annotations

import io
import math
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from capray.io import manifest
from capray.io.storage import get_fs, join, write_bytes_atomic

DELETE_CHUNK = 1000
RESULT_SCHEMA = pa.schema([("file", pa.string()), ("rows", pa.int64()), ("rows_in", pa.int64())])


@dataclass
class Compaction:
    files_before: int
    files_after: int
    rows: int


class CompactionIncomplete(RuntimeError):
    """The written buckets do not account for every row read: nothing was deleted."""


def _write_bucket(group: pa.Table, output: str, generation: str, storage_options: dict[str, Any]) -> pa.Table:
    bucket = int(group.column("_bucket")[0].as_py())
    rows = manifest.latest_rows(group.drop_columns(["_bucket"]).cast(manifest.SCHEMA))
    buf = io.BytesIO()
    pq.write_table(rows, buf)
    uri = join(output, manifest.MANIFEST_DIR, manifest.compacted_name(generation, bucket, rows.num_rows))
    fs, path = get_fs(uri, storage_options)
    write_bytes_atomic(fs, path, buf.getvalue())
    return pa.table({"file": [path], "rows": [rows.num_rows], "rows_in": [group.num_rows]}, schema=RESULT_SCHEMA)


def _read_files(batch: pa.Table, output: str, storage_options: dict[str, Any]) -> pa.Table:
    import pyarrow.dataset as pads

    fs, _ = manifest.manifest_path(output, storage_options)
    files = batch.column("file").to_pylist()
    return pads.dataset(files, schema=manifest.SCHEMA, format="parquet", filesystem=manifest.arrow_fs(fs)).to_table()


def _add_bucket(batch: pa.Table, buckets: int) -> pa.Table:
    idents = batch.column("identity").to_pylist()
    return batch.append_column("_bucket", pa.array([manifest.bucket_of(i or "", buckets) for i in idents], pa.int32()))


def compact(output: str, cfg) -> Compaction:
    """Compact OUT/manifest on the connected Ray cluster; returns file counts before and after."""
    import ray

    so = cfg.batch.storage_options
    fs, path = manifest.manifest_path(output, so)
    files = manifest.manifest_files(fs, path)
    if not files:
        return Compaction(0, 0, 0)
    rows = _count_rows(fs, files)  # what the files hold, before de-duplication
    buckets = max(1, math.ceil(rows / cfg.batch.manifest_rows_per_file))
    generation = uuid.uuid4().hex[:12]
    try:
        results = _write_compacted(files, output, generation, buckets, cfg)
        taken_in = sum(r["rows_in"] for r in results)
        if taken_in != rows:  # never delete a file whose rows are not all in the new ones
            raise CompactionIncomplete(f"compacting {len(files)} manifest files: they hold {rows} rows but "
                                       f"{taken_in} reached the compacted files; no file was deleted")
    except Exception:  # the files read still hold every row; this generation's would only repeat some
        _discard(fs, path, generation)
        raise
    new_files = {r["file"] for r in results}
    stale = [f for f in files if f not in new_files]
    delete = ray.remote(num_cpus=cfg.batch.cpus_per_io_task, max_retries=cfg.batch.io_retries,
                        retry_exceptions=True)(_delete)
    ray.get([delete.remote(stale[i:i + DELETE_CHUNK], output, so) for i in range(0, len(stale), DELETE_CHUNK)])
    return Compaction(len(files), len(manifest.manifest_files(fs, path)), rows)


def _write_compacted(files: list[str], output: str, generation: str, buckets: int, cfg) -> list[dict[str, Any]]:
    """Write this generation's compacted files; one RESULT_SCHEMA row per file written."""
    import ray

    so = cfg.batch.storage_options
    if buckets == 1:  # one output file: a single task reads everything (bounded by rows_per_file rows)
        # idempotent (a retry rewrites the same generation's file): Ray retries it on any error
        task = ray.remote(num_cpus=cfg.batch.cpus_per_io_task, max_retries=cfg.batch.io_retries,
                          retry_exceptions=True)(_compact_all)
        return [ray.get(task.remote(files, output, generation, so))]
    # Files are read in tasks: Ray's `read_parquet` would stat every file from the driver.
    ds = ray.data.from_items([{"file": f} for f in files], override_num_blocks=min(len(files), 64))
    ds.context.max_errored_blocks = 0  # a dropped block would be rows lost: fail, whatever the driver set
    ds = ds.map_batches(_read_files, batch_format="pyarrow", num_cpus=cfg.batch.cpus_per_io_task,
                        fn_kwargs={"output": output, "storage_options": so})
    written = (ds.map_batches(_add_bucket, batch_format="pyarrow", fn_kwargs={"buckets": buckets})
               .groupby("_bucket", num_partitions=buckets)
               .map_groups(_write_bucket, batch_format="pyarrow",
                           fn_kwargs={"output": output, "generation": generation, "storage_options": so}))
    return list(written.iter_rows())


def _discard(fs: Any, path: str, generation: str) -> None:
    """Best effort: remove what a failed compaction wrote, so the folder is as it was."""
    prefix = f"{manifest.COMPACT_PREFIX}{generation}-"
    try:
        for f in manifest.manifest_files(fs, path):
            if posixpath.basename(f).startswith(prefix):
                fs.rm_file(f)
    except OSError:
        pass  # left over: the same rows twice, which readers and the next compaction resolve


def _delete(files: list[str], output: str, storage_options: dict[str, Any]) -> None:
    """Delete superseded files (in a task: one request each, so not on the driver)."""
    fs, _ = manifest.manifest_path(output, storage_options)
    for f in files:
        try:
            fs.rm_file(f)
        except FileNotFoundError:
            pass


def _count_rows(fs: Any, files: list[str]) -> int:
    """Rows in all files: from their names where they carry it, else from the Parquet footer."""
    import pyarrow.dataset as pads

    counts = [manifest.rows_in(f) for f in files]
    unnamed = [f for f, n in zip(files, counts) if n is None]
    footer = pads.dataset(unnamed, format="parquet", filesystem=manifest.arrow_fs(fs)).count_rows() if unnamed else 0
    return sum(n for n in counts if n is not None) + footer


def _compact_all(files: list[str], output: str, generation: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    table = _read_files(pa.table({"file": files}), output, storage_options)
    return _write_bucket(table.append_column("_bucket", pa.array([0] * table.num_rows, pa.int32())),
                         output, generation, storage_options).to_pylist()[0]
