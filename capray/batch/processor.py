"""The bulk job as a processor of Ray Data stages, the shape of Ray's own `ray.data.llm` processors:
a config builds it, and `processor(ds)` turns a Dataset of identity groups into a Dataset of records.

    processor = build_processor(cfg, output="s3://bucket/protected")
    records = processor(ray.data.from_items([{"identity": "alice", "uris": [...]}]))

A platform whose photos come from its own database applies it to the Dataset it already has;
`capray protect` runs the same processor on each slice of its sweep over the library. Each row is one identity:
`identity` and `uris` (its photos; optional `sizes` and `versions`, e.g. ETags, spare a request each
when fingerprinting). Each output row is one identity's summary (`capray.batch.rows.SUMMARY_SCHEMA`):
status, failure class, error, output URIs, seconds, the λ chosen; the full record is in OUT/manifest/.

One row per identity all the way (no `groupby().map_groups()`, which would shuffle and block the
stream): check (done-check, in tasks) → one identity per block → decode (CPU tasks) → protect (actor
pool) → write (CPU tasks) → commit (CPU tasks, `batch.records_per_commit` identities per file).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any

from capray.batch.plan import Plan, dataset_plan, write_run_file
from capray.batch.resources import actor_pool_args
from capray.batch.stages import CheckStage, CommitStage, DecodeStage, ProtectStage, WriteStage
from capray.config import CaprayConfig
from capray.io.storage import TransientStorageError, normalize_uri

# Ray Data merges a task's small output blocks up to `target_max_block_size` (128 MiB) before passing
# them on, so with the default a whole slice's candidates would reach the check stage as one
# block and be checked as one: nothing would reach the GPUs until everything was listed. Small blocks
# keep the stream moving; blocks of decoded photos are bigger anyway and are cut at identity rows.
STREAM_BLOCK_BYTES = 128 * 1024
# A small library gives the check stage fewer input blocks than `batch.listing_tasks`: expected, not news.
warnings.filterwarnings("ignore", message=r"The maximum number of concurrent tasks for 'MapBatches\(CheckStage\)'")


@dataclass
class Processor:
    """check → decode → protect → write → commit over a Dataset of identities, into `plan.output`.

    `allowed`: prefixes photo URIs must lie under (None: not restricted); `tally`, `ledger_name`,
    `pool_name`: the job's counting, attempt-ledger and scoring-pool actors (None: counted nowhere,
    attempts counted per actor, sharding off)."""

    cfg: CaprayConfig
    plan: Plan
    allowed: list[str] | None = None
    tally: Any = None
    ledger_name: str | None = None
    pool_name: str | None = None
    protect_stage: type = ProtectStage
    _owned: contextlib.ExitStack | None = None  # actors this processor started (build_processor)

    def __call__(self, ds):
        """Lazily chain the stages onto `ds`; nothing runs until the result is consumed."""
        import ray

        b, plan = self.cfg.batch, self.plan
        # A Dataset carries the DataContext it was created with, and every stage derived from it shares that
        # object: the job's settings go on a copy of the caller's Dataset (and so of its context), never on
        # the caller's Dataset nor the driver's current context, which compaction builds from (there a
        # dropped block would be rows deleted with the files they came from).
        ds = type(ds).copy(ds, _deep_copy=True)
        settings = {
            "enable_progress_bars": False,  # the job's own one-line display counts identities, not blocks
            "print_on_execution_start": False,
            "max_errored_blocks": -1,  # a broken block must not take the other identities down; counted
            "target_max_block_size": STREAM_BLOCK_BYTES,
            # Transient storage errors (TransientStorageError from decode, write and commit) re-run the task
            # with Ray Data's exponential backoff; botocore has already retried each request (storage.S3_RETRIES).
            "retried_map_errors": [TransientStorageError.__name__],
            "max_map_retries": b.io_retries,
        }
        for name, value in settings.items():
            setattr(ds.context, name, value)
        io = {"batch_format": "pyarrow", "num_cpus": b.cpus_per_io_task, "udf_modifying_row_count": False}
        check = CheckStage(self.cfg, plan.output, allowed=self.allowed, resuming=plan.resuming, tally=self.tally)
        # Listing runs ahead of the GPUs anyway; bounding its tasks keeps CPU slots for decode/write/commit,
        # so the first commit does not wait for the library to be listed.
        ds = ds.map_batches(check, batch_size=b.listing_batch, batch_format="pyarrow",
                            num_cpus=b.cpus_per_io_task, compute=ray.data.TaskPoolStrategy(size=b.listing_tasks))
        ds = ds.repartition(target_num_rows_per_block=b.groups_per_batch)  # one block per actor call
        ds = ds.map_batches(DecodeStage(self.cfg, self.allowed, self.ledger_name, plan.output), batch_size=1, **io)
        # Ray Data's defaults (max_restarts=-1, max_task_retries=-1) stay: the attempt ledger bounds each
        # group's attempts (capray.batch.attempts), and node losses still heal.
        ds = ds.map_batches(self.protect_stage.configured(self.cfg, self.ledger_name, self.pool_name),
                            batch_size=b.groups_per_batch, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=b.num_actors),
                            **actor_pool_args(b), udf_modifying_row_count=False)
        ds = ds.map_batches(WriteStage(self.cfg, plan.output, plan.run_id), batch_size=1, **io)
        return ds.map_batches(CommitStage(self.cfg, plan.output, plan.run_id, plan.fence),
                              batch_size=b.records_per_commit, **io)

    @classmethod
    def start(cls, cfg: CaprayConfig, plan: Plan, allowed: list[str] | None = None, tally: Any = None,
              protect_stage: type = ProtectStage) -> Processor:
        """A processor with the job's own attempt ledger and (sharding on) scoring pool, started on this
        driver's node; `close()` (or the `with` block) stops them."""
        from capray.batch.attempts import job_ledger
        from capray.distributed.pool import scoring_pool

        owned = contextlib.ExitStack()
        try:
            ledger_name = owned.enter_context(job_ledger())
            pool_name = owned.enter_context(scoring_pool(cfg.model.model_dump_json(), cfg.sharding))
        except BaseException:
            owned.close()
            raise
        return cls(cfg, plan, allowed, tally, ledger_name, pool_name, protect_stage, owned)

    def stop(self) -> None:
        """From now on no group starts: the protect stage gives them back as deferred (see stopping.py)."""
        from capray.batch.attempts import LedgerClient

        if self.ledger_name:
            LedgerClient(self.ledger_name).stop()

    def close(self) -> None:
        """Stop the actors `start` started (the attempt ledger, the scoring pool)."""
        if self._owned is not None:
            self._owned.close()
            self._owned = None

    def __enter__(self) -> Processor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_processor(cfg: CaprayConfig, output: str, *, allowed_input_prefixes: list[str] | None = None,
                    protect_stage: type = ProtectStage) -> Processor:
    """A processor that protects a Ray Dataset of identity groups into `output` (Ray must be connected).

    Like `capray protect`, it refuses an OUTPUT that holds a run with another engine config, writes
    OUT/run.json, and skips identities already done with the same input. Photo URIs are restricted
    to `allowed_input_prefixes` (default: `batch.allowed_input_prefixes`; empty: not restricted — set it
    when the Dataset's URIs come from users). Use it as a context manager, or call `close()`, to stop
    the actors it starts; they also end with the driver.
    """
    plan = dataset_plan(output, cfg)
    write_run_file(plan, cfg)
    prefixes = allowed_input_prefixes if allowed_input_prefixes is not None else cfg.batch.allowed_input_prefixes
    return Processor.start(cfg, plan, [normalize_uri(p) for p in prefixes] or None, protect_stage=protect_stage)
