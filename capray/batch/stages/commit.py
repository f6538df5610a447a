"""Stage 6, commit (CPU tasks, `batch.records_per_commit` identities per call): one Parquet file with all
their manifest rows, then each identity's state for the next run's done-check. Returns small summary
rows, the only thing that reaches the driver (progress, metrics)."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from capray.batch.rows import SUMMARY_SCHEMA, table_of
from capray.batch.stages.base import Stage, short_error
from capray.io import manifest
from capray.io.lease import check_fence
from capray.io.storage import TransientStorageError, is_transient

log = logging.getLogger(__name__)


class CommitStage(Stage):
    output_schema = SUMMARY_SCHEMA

    def __init__(self, cfg, output: str, run_id: str, fence: dict[str, Any] | None = None):
        super().__init__(cfg)
        self.output, self.run_id, self.fence = output, run_id, fence

    def __call__(self, batch: pa.Table) -> pa.Table:
        return table_of(self.commit(batch.to_pylist()), SUMMARY_SCHEMA)

    def commit(self, written: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The records file first (after the identities' PNGs), then their states; a summary row each."""
        so = self.cfg.batch.storage_options
        deferred = [w for w in written if w.get("deferred")]
        written = [w for w in written if not w.get("deferred")]
        rows = [manifest.ManifestRow.model_validate_json(w["row"]) for w in written]
        records_error = None
        if rows and self.fence is not None:  # OUTPUT's lease still this job's? (one GET per commit)
            try:
                check_fence(self.fence, storage_options=so)  # LeaseLost: nothing of this batch is committed
            except OSError as exc:
                if is_transient(exc):  # the store, not the lease: Ray Data retries the whole commit task
                    raise TransientStorageError(f"checking OUTPUT's lease: {short_error(exc)}") from exc
                raise
        if rows:
            try:
                manifest.write_records(self.output, self.run_id, rows, so)
            except Exception as exc:
                if is_transient(exc):  # the file name is deterministic: a retried task overwrites its own file
                    raise TransientStorageError(f"committing {len(rows)} manifest rows: {short_error(exc)}") from exc
                log.exception("committing %d manifest rows failed", len(rows))
                records_error = f"committing its manifest row failed: {short_error(exc)}"

        def save_state(pair) -> str | None:
            """None when committed; else why not (the driver names the identity, a rerun redoes it).
            The per-identity state serves point lookups (a platform's Dataset); a sweep reads the rows."""
            w, row = pair
            if records_error:
                return records_error
            if not w["prev_known"]:
                return None
            try:
                if row.status == manifest.STATUS_DELETED:
                    manifest.remove_state(self.output, w["safe"], so)
                else:
                    manifest.write_state(self.output, w["safe"], manifest.state_of(row), so)
            except Exception as exc:
                if is_transient(exc):  # the whole commit task re-runs; its records file is overwritten
                    raise TransientStorageError(f"saving the state of {row.identity!r}: {short_error(exc)}") from exc
                log.exception("saving the committed state of %r failed", row.identity)
                return f"saving its committed state failed: {short_error(exc)}"
            return None

        with ThreadPoolExecutor(max_workers=max(1, min(self.cfg.batch.listing_threads, len(rows)))) as pool:
            problems = list(pool.map(save_state, zip(written, rows)))
        return [{"identity": r.identity, "status": r.status, "failure_class": r.failure_class,
                 "error": problem or r.error, "committed": problem is None, "output_uris": r.output_uris,
                 "seconds": r.seconds, "engine_seconds": r.engine_seconds, "pgd_steps": r.pgd_steps,
                 "lambda_collapsed": r.lambda_collapsed,
                 "lambdas": [v for v in (r.lambda_schedule or []) if v is not None], "deferred": False}
                for r, problem in zip(rows, problems)] + [
                {"identity": w["identity"], "committed": False, "deferred": True} for w in deferred]
