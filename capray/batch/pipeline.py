"""The Ray Data job, streamed end to end:

    candidates (root listing pages | manifest files) → check (list photos, fingerprint, done-check)
    → repartition(1 row per block) → decode (CPU tasks) → protect (actor pool) → write PNGs (CPU tasks)
    → commit (CPU tasks, `batch.records_per_commit` identities per Parquet file) → summaries → driver

One row per identity all the way (no `groupby().map_groups()`, which would shuffle and block the
stream). The driver holds no list of identities: it iterates small summary rows, and listing and
the done-check run in tasks, so its memory and its time to the first commit do not grow with the
library. Resume and incremental runs are the done-check: an identity whose committed state has the
same input fingerprint and says `ok` (or failed for its input) is skipped. At the end the manifest
is compacted (`capray/batch/compact.py`).
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from capray.batch.attempts import job_ledger
from capray.distributed.pool import scoring_pool
from capray.batch.metrics import JobMetrics
from capray.batch.plan import Plan, write_run_file
from capray.batch.progress import Progress
from capray.batch.resources import actor_pool_args
from capray.batch.settle import NAMES_KEPT, report_uncommitted
from capray.batch.sources import candidates, check_batch, plan_info
from capray.batch.stages import ProtectActor, commit_batch, decode_batch, write_batch
from capray.config import CaprayConfig
from capray.exit_codes import EXIT_FAILED, EXIT_INPUT_FAILED, EXIT_OK
from capray.io.allowlist import allowed_prefixes
from capray.io.storage import TransientStorageError, get_fs, join, write_bytes_atomic

TALLY_POLL_S = 2.0
# Ray Data merges a task's small output blocks up to `target_max_block_size` (128 MiB) before passing
# them on, so with the default a whole library's names (~30 B each) would leave the listing task as one
# block and be checked as one: nothing would reach the GPUs until everything was listed. Small blocks
# keep the stream moving; blocks of decoded photos are bigger anyway and are cut at identity rows.
STREAM_BLOCK_BYTES = 128 * 1024
# A small library gives the listing stage fewer input blocks than `batch.listing_tasks`: expected, not news.
warnings.filterwarnings("ignore", message=r"The maximum number of concurrent tasks for 'MapBatches\(check_batch\)'")


@dataclass
class JobSummary:
    total: int  # identities listed
    skipped: int  # already ok with unchanged input
    ok: int
    failed: int  # failed in this run (input + transient)
    unfinished: int  # listed but neither skipped nor committed (a stage error dropped them): rerun retries
    output: str
    failed_input: int = 0  # of `failed`: the input's fault (not retried until it changes)
    skipped_input: int = 0  # failed for their input before, input unchanged: not retried
    source_errors: list[str] = field(default_factory=list)  # manifest files or the root listing unusable
    fail_on_input_errors: bool = False
    unfinished_identities: list[str] = field(default_factory=list)  # the ones known by name (first 1,000)

    @property
    def failed_transient(self) -> int:
        return self.failed - self.failed_input

    @property
    def exit_code(self) -> int:
        """0 nothing a rerun could fix; 1 a rerun retries something; 3 input failures and asked to fail on them."""
        if self.failed_transient or self.unfinished or self.source_errors:
            return EXIT_FAILED
        if self.fail_on_input_errors and (self.failed_input or self.skipped_input):
            return EXIT_INPUT_FAILED
        return EXIT_OK


def build_dataset(plan: Plan, cfg: CaprayConfig, tally, actor_cls: type = ProtectActor, ledger_name: str | None = None,
                  pool_name: str | None = None):
    import ray

    b = cfg.batch
    # The dataset keeps its own copy of the context, so the job's settings are put back once it is
    # built: the driver's context is the one compaction (and anything else in this process) builds from,
    # and there a dropped block would be rows deleted with the files they came from.
    job_settings = {
        "enable_progress_bars": False,  # our own one-line display counts identities, not blocks
        "print_on_execution_start": False,  # the plan is in the docs; keep the console to our progress line
        "max_errored_blocks": -1,  # a broken block must not take the other identities down; counted below
        "target_max_block_size": STREAM_BLOCK_BYTES,
        # Transient storage errors (raised as TransientStorageError by decode, write and commit) re-run the
        # task with Ray Data's exponential backoff; botocore has already retried each request (storage.S3_RETRIES).
        "retried_map_errors": [TransientStorageError.__name__],
        "max_map_retries": b.io_retries,
    }
    ctx = ray.data.DataContext.get_current()
    defaults = {name: getattr(ctx, name) for name in job_settings}
    for name, value in job_settings.items():
        setattr(ctx, name, value)
    try:
        return _stages(plan, cfg, tally, actor_cls, ledger_name, pool_name)
    finally:
        for name, value in defaults.items():
            setattr(ctx, name, value)


def _stages(plan: Plan, cfg: CaprayConfig, tally, actor_cls: type, ledger_name: str | None, pool_name: str | None):
    import ray

    b = cfg.batch
    config_json = cfg.model_dump_json()
    io_args = {"batch_format": "pyarrow", "num_cpus": b.cpus_per_io_task, "udf_modifying_row_count": False}
    ds = candidates(plan, cfg, tally)
    # Listing runs ahead of the GPUs anyway; bounding its tasks keeps CPU slots for decode/write/commit,
    # so the first commit does not wait for the library to be listed.
    ds = ds.map_batches(check_batch, batch_size=b.listing_batch, batch_format="pyarrow", num_cpus=b.cpus_per_io_task,
                        compute=ray.data.TaskPoolStrategy(size=b.listing_tasks),
                        fn_kwargs={"config_json": config_json, "plan_info": plan_info(plan), "tally": tally})
    ds = ds.repartition(target_num_rows_per_block=b.groups_per_batch)  # one block per actor call: spread over actors
    allowed = allowed_prefixes(plan.input, b.allowed_input_prefixes)
    ds = ds.map_batches(decode_batch, batch_size=1, fn_kwargs={"config_json": config_json, "allowed": allowed},
                        **io_args)
    # The config rides on a subclass rather than in constructor args: Ray keeps constructor args in
    # the object store, and a restarted actor (max_restarts=-1) would need them there (ray#53727).
    # Ray Data's defaults (max_restarts=-1, max_task_retries=-1) stay: the job's attempt ledger bounds
    # each group's attempts (capray.batch.attempts), and node losses still heal.
    configured = type(actor_cls.__name__, (actor_cls,), {"CONFIG_JSON": config_json, "LEDGER_NAME": ledger_name,
                                                         "SCORING_POOL": pool_name})
    ds = ds.map_batches(configured, batch_size=b.groups_per_batch, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=b.num_actors),
                        **actor_pool_args(b), udf_modifying_row_count=False)
    ds = ds.map_batches(write_batch, batch_size=1, fn_kwargs={"config_json": config_json, "output": plan.output},
                        **io_args)
    ds = ds.map_batches(commit_batch, batch_size=b.records_per_commit,
                        fn_kwargs={"config_json": config_json, "output": plan.output, "run_id": plan.run_id},
                        **io_args)
    return ds


def run_job(plan: Plan, cfg: CaprayConfig, *, actor_cls: type = ProtectActor,
            on_result: Callable[[dict[str, Any]], None] | None = None, show_progress: bool = True) -> JobSummary:
    """Run `plan` on the connected Ray cluster: protect what is not done, compact, return the counts."""
    import ray

    from capray.batch.compact import compact
    from capray.batch.tally import start_tally

    tally = start_tally()
    progress = Progress(enabled=show_progress)
    metrics = JobMetrics(cfg.cap.ratio_max, cfg.batch.metrics_port)
    failed_input, last_poll, uncommitted, n_uncommitted = 0, 0.0, [], 0
    # The scoring pool (sharding on) belongs to this driver: protect actors borrow from it, never wait on it.
    with job_ledger() as ledger_name, scoring_pool(cfg.model.model_dump_json(), cfg.sharding) as pool_name:
        for summary in build_dataset(plan, cfg, tally, actor_cls, ledger_name, pool_name).iter_rows():
            if not summary["committed"]:  # no row or no state: named at the end, counted unfinished
                n_uncommitted += 1
                if len(uncommitted) < NAMES_KEPT:
                    uncommitted.append((summary["identity"], summary["error"]))
                continue
            failed_input += summary["status"] != "ok" and summary["failure_class"] == "input"
            progress.update(summary["status"])
            if time.monotonic() - last_poll > TALLY_POLL_S:  # listing counts come from the workers
                last_poll = time.monotonic()
                progress.listed(ray.get(tally.snapshot.remote()))
            metrics.observe(summary, progress.remaining or 0)
            if on_result is not None:
                on_result(summary)
    counts = ray.get(tally.snapshot.remote())
    progress.listed(counts, final=True)
    progress.finish()
    expected_sources = 1 if plan.kind == "folder" else len(plan.manifest_files)
    errors = list(counts["source_errors"])
    if counts["sources_done"] < expected_sources and not errors:
        errors.append(f"{expected_sources - counts['sources_done']} input listing task(s) did not finish")
    skipped = counts["skipped_ok"] + counts["skipped_input"]
    done = skipped + progress.ok + progress.failed
    summary = JobSummary(counts["listed"], counts["skipped_ok"], progress.ok, progress.failed,
                         max(0, counts["listed"] - done), plan.output, failed_input, counts["skipped_input"],
                         errors, cfg.batch.fail_on_input_errors, report_uncommitted(uncommitted, n_uncommitted))
    metrics.remaining.set(summary.unfinished)
    fs, path = get_fs(join(plan.output, "metrics.prom"), cfg.batch.storage_options)
    write_bytes_atomic(fs, path, metrics.text())
    compaction = None
    if cfg.batch.compact_at_end and (progress.ok or progress.failed):
        try:
            compaction = compact(plan.output, cfg)
        except Exception as exc:  # every row is committed already: compaction only tidies the files
            print(f"capray protect: compacting the manifest failed ({type(exc).__name__}: {exc}); the rows are "
                  f"all there, run `capray manifest compact {plan.output}` to compact them", file=sys.stderr)
    write_run_file(plan, cfg, {"totals": {
        "identities": summary.total, "ok": summary.ok, "failed": summary.failed, "failed_input": failed_input,
        "skipped_ok": summary.skipped, "skipped_input": summary.skipped_input, "unfinished": summary.unfinished,
        "ignored_input_entries": counts["ignored"], "source_errors": errors,
        "manifest_files": compaction.files_after if compaction else None},
        "ignored_input_sample": counts["ignored_sample"]})
    return summary
