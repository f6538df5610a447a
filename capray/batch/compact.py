"""Compaction of `OUT/manifest/`: a run's commit files folded into a few sorted files, in proportion to change.

The manifest's rows live in *main* files (disjoint sorted ranges of identities, one row each, up to
`batch.manifest_rows_per_file`) and *delta* files (later rows, sorted, each spanning every range),
both named in `OUT/manifest/_index.json` with their identity ranges (`manifest.ManifestIndex`).

- After a run (and before a sweep, if a stopped run left commit files behind), its `part-` files
  become new delta files: the bytes written follow what changed, not the library's size.
- When the deltas hold more than `batch.manifest_delta_ratio` of the main files' rows, or on
  `capray manifest compact OUT` (`full=True`), main and delta files and parts are merged into new
  main files, one row per identity. Rows are sorted with Ray Data's distributed sort (range
  partitions), each partition written as one file by a task; the driver holds only file names.

Nothing is lost on a crash: the files read are deleted only after the new ones are written, every
row is accounted for, and the index names them. A crash before the index is written leaves the new
files unnamed (removed by the next compaction); one after it leaves the old files, which repeat rows
readers resolve by the latest `finished_at`. Legacy `compact-` files (from before the index) are
folded in like parts. Each file's per-step arrays stay in `_steps/`, which is never rewritten.
"""

from __future__ import annotations

import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from capray.io import manifest
from capray.io.discover import FOLDER_ORDER, order_key
from capray.io.storage import get_fs, join, write_bytes_atomic

DELETE_CHUNK = 1000
LEGACY_PREFIX = "compact-"


@dataclass
class Compaction:
    files_before: int
    files_after: int
    rows: int  # rows read
    full: bool = False  # merged into new main files (else: a run's parts into deltas)
    bytes_written: int = 0  # files and index this compaction wrote
    manifest_bytes: int = 0  # the whole manifest after it (indexed files and index)


class CompactionIncomplete(RuntimeError):
    """The written files do not account for every row read: nothing was deleted."""


def _read_files(files: list[str], output: str, storage_options: dict[str, Any]) -> pa.Table:
    import pyarrow.dataset as pads

    fs, _ = manifest.manifest_path(output, storage_options)
    return pads.dataset(files, schema=manifest.SCHEMA, format="parquet",
                        filesystem=manifest.arrow_fs(fs)).to_table()


def _write_sorted(table: pa.Table, output: str, prefix: str, generation: str,
                  storage_options: dict[str, Any]) -> dict[str, Any]:
    """One file of the latest row per identity, sorted; its index entry and the rows it took in."""
    rows = manifest.latest_rows(table.select(manifest.SCHEMA.names).cast(manifest.SCHEMA))
    idents = rows.column("identity").to_pylist()
    keys = [order_key(i, FOLDER_ORDER) for i in idents]
    data = manifest.parquet_bytes(rows)
    name = manifest.compacted_name(prefix, generation, idents[0], rows.num_rows)
    fs, path = get_fs(join(output, manifest.MANIFEST_DIR, name), storage_options)
    write_bytes_atomic(fs, path, data)
    entry = manifest.IndexedFile(file=name, rows=rows.num_rows, bytes=len(data), first=idents[0], last=idents[-1],
                                 first_folder_key=min(keys), last_folder_key=max(keys))
    return {"entry": entry.model_dump_json(), "rows_in": table.num_rows}


def _sort_and_write(batch: pa.Table, output: str, prefix: str, generation: str,
                    storage_options: dict[str, Any]) -> pa.Table:
    if batch.num_rows == 0:
        return pa.table({"entry": pa.array([], pa.string()), "rows_in": pa.array([], pa.int64())})
    return pa.Table.from_pylist([_write_sorted(batch, output, prefix, generation, storage_options)])


def _read_batch(batch: pa.Table, output: str, storage_options: dict[str, Any]) -> pa.Table:
    return _read_files(batch.column("file").to_pylist(), output, storage_options)


def compact(output: str, cfg, *, full: bool = False) -> Compaction:
    """Fold OUT/manifest's commit files into deltas, or (`full`, or deltas past the ratio) everything into
    new main files, on the connected Ray cluster."""
    so, b = cfg.batch.storage_options, cfg.batch
    fs, path = manifest.manifest_path(output, so)
    index = manifest.read_index(output, so)
    indexed = {e.file for e in index.files}
    names = manifest.manifest_files(fs, path)
    parts = [f for f in names if posixpath.basename(f) not in indexed
             and posixpath.basename(f).startswith((manifest.PART_PREFIX, LEGACY_PREFIX))]
    garbage = [f for f in names if posixpath.basename(f) not in indexed and f not in parts]
    part_rows = _count_rows(fs, parts)
    main_rows, delta_rows = sum(e.rows for e in index.main), sum(e.rows for e in index.deltas)
    if not parts and not (full and index.files):
        _delete_all(garbage, output, cfg)
        return Compaction(len(names), len(index.files), 0, manifest_bytes=sum(e.bytes for e in index.files))
    full = full or not index.main or delta_rows + part_rows > b.manifest_delta_ratio * main_rows
    inputs = parts + ([posixpath.join(path, e.file) for e in index.files] if full else [])
    expected = part_rows + (main_rows + delta_rows if full else 0)
    generation = uuid.uuid4().hex[:12]
    prefix = manifest.MAIN_PREFIX if full else manifest.DELTA_PREFIX
    try:
        results = _write_generation(inputs, expected, output, prefix, generation, cfg)
    except Exception:  # the files read still hold every row; this generation's would only repeat some
        _discard(fs, path, generation)
        raise
    taken_in = sum(r["rows_in"] for r in results)
    entries = sorted((manifest.IndexedFile.model_validate_json(r["entry"]) for r in results), key=lambda e: e.first)
    if taken_in != expected:  # never delete a file whose rows are not all in the new ones
        _discard(fs, path, generation)
        raise CompactionIncomplete(f"compacting {len(inputs)} manifest files: they hold {expected} rows but "
                                   f"{taken_in} reached the compacted files; no file was deleted")
    new_index = (manifest.ManifestIndex(main=entries) if full
                 else manifest.ManifestIndex(main=index.main, deltas=index.deltas + entries))
    index_bytes = manifest.write_index(output, new_index, so)
    _delete_all(inputs + garbage, output, cfg)
    return Compaction(len(names), len(new_index.files), expected, full,
                      bytes_written=sum(e.bytes for e in entries) + index_bytes,
                      manifest_bytes=sum(e.bytes for e in new_index.files) + index_bytes)


def _write_generation(files: list[str], rows: int, output: str, prefix: str, generation: str,
                      cfg) -> list[dict[str, Any]]:
    """Write the sorted files of this generation; one {"entry", "rows_in"} per file written."""
    import ray

    so, b = cfg.batch.storage_options, cfg.batch
    if rows <= b.manifest_rows_per_file:  # one file: a single task (idempotent: Ray retries it on any error)
        task = ray.remote(num_cpus=b.cpus_per_io_task, max_retries=b.io_retries, retry_exceptions=True)(
            _one_file)
        result = ray.get(task.remote(files, output, prefix, generation, so))
        return [result] if result else []
    # Files are read in tasks (Ray's `read_parquet` would stat every file from the driver), then sorted
    # by Ray Data into about rows/rows_per_file range partitions, each written as one file.
    partitions = max(1, -(-rows // b.manifest_rows_per_file))
    ds = ray.data.from_items([{"file": f} for f in files], override_num_blocks=min(len(files), partitions))
    ds.context.max_errored_blocks = 0  # a dropped block would be rows lost: fail, whatever the driver set
    ds = ds.map_batches(_read_batch, batch_format="pyarrow", batch_size=max(1, -(-len(files) // partitions)),
                        num_cpus=b.cpus_per_io_task, fn_kwargs={"output": output, "storage_options": so})
    ds = ds.repartition(partitions).sort("identity")
    written = ds.map_batches(_sort_and_write, batch_size=None, batch_format="pyarrow", num_cpus=b.cpus_per_io_task,
                             fn_kwargs={"output": output, "prefix": prefix, "generation": generation,
                                        "storage_options": so})
    return written.take_all()


def _one_file(files: list[str], output: str, prefix: str, generation: str,
              storage_options: dict[str, Any]) -> dict[str, Any] | None:
    table = _read_files(files, output, storage_options)
    return _write_sorted(table, output, prefix, generation, storage_options) if table.num_rows else None


def _discard(fs: Any, path: str, generation: str) -> None:
    """Best effort: remove what a failed compaction wrote, so the folder is as it was."""
    try:
        for f in manifest.manifest_files(fs, path):
            if posixpath.basename(f).startswith((f"{manifest.MAIN_PREFIX}{generation}-",
                                                 f"{manifest.DELTA_PREFIX}{generation}-")):
                fs.rm_file(f)
    except OSError:
        pass  # unnamed in the index: the next compaction removes them


def _delete(files: list[str], output: str, storage_options: dict[str, Any]) -> None:
    """Delete superseded files (in a task: one request each, so not on the driver)."""
    fs, _ = manifest.manifest_path(output, storage_options)
    for f in files:
        try:
            fs.rm_file(f)
        except FileNotFoundError:
            pass


def _delete_all(files: list[str], output: str, cfg) -> None:
    if not files:
        return
    import ray

    b = cfg.batch
    delete = ray.remote(num_cpus=b.cpus_per_io_task, max_retries=b.io_retries, retry_exceptions=True)(_delete)
    ray.get([delete.remote(files[i:i + DELETE_CHUNK], output, b.storage_options)
             for i in range(0, len(files), DELETE_CHUNK)])


def _count_rows(fs: Any, files: list[str]) -> int:
    """Rows in all files: from their names where they carry it, else from the Parquet footer."""
    import pyarrow.dataset as pads

    counts = [manifest.rows_in(f) for f in files]
    unnamed = [f for f, n in zip(files, counts) if n is None]
    footer = pads.dataset(unnamed, format="parquet", filesystem=manifest.arrow_fs(fs)).count_rows() if unnamed else 0
    return sum(n for n in counts if n is not None) + footer
