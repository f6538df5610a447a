"""The Ray Data job: plan rows → repartition → decode (CPU tasks) → protect (actor pool) → write (CPU tasks).

One row per identity all the way (no `groupby().map_groups()`, which would shuffle and block the
stream); `repartition(target_num_rows_per_block=1)` spreads the groups over actors. The driver only
iterates small summary rows (keeping the names that committed, so that `settle_missing` can give the
others a row), and Ray Data's streaming executor bounds what is in flight. Resume is the manifest:
identities with an `ok` row were left out of the plan, and every identity commits its row only after
its PNGs are written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from capray.batch.attempts import job_ledger
from capray.batch.metrics import JobMetrics
from capray.batch.plan import Plan
from capray.batch.progress import Progress
from capray.batch.resources import actor_pool_args
from capray.batch.settle import settle_missing
from capray.batch.stages import PLAN_SCHEMA, ProtectActor, decode_batch, write_batch
from capray.config import CaprayConfig
from capray.io.allowlist import allowed_prefixes
from capray.io.storage import TransientStorageError, get_fs, join, write_bytes_atomic


@dataclass
class JobSummary:
    total: int
    skipped: int
    ok: int
    failed: int
    unfinished: int  # identities without a row even after settle_missing (storage down); a rerun retries them
    output: str
    unfinished_identities: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 0 if self.failed == 0 and self.unfinished == 0 else 1


def build_dataset(plan: Plan, cfg: CaprayConfig, actor_cls: type = ProtectActor, ledger_name: str | None = None):
    import pyarrow as pa
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own one-line display counts identities, not blocks
    ctx.print_on_execution_start = False  # the plan is in the docs; keep the console to our progress line
    ctx.max_errored_blocks = -1  # a broken block must not take the other identities down; counted below
    b = cfg.batch
    # Transient storage errors (raised as TransientStorageError by decode and write) re-run the task
    # with Ray Data's exponential backoff; botocore has already retried each request (storage.S3_RETRIES).
    ctx.retried_map_errors = [TransientStorageError.__name__]
    ctx.max_map_retries = b.io_retries
    config_json = cfg.model_dump_json()
    ds = ray.data.from_arrow(pa.Table.from_pylist(plan.pending, schema=PLAN_SCHEMA))
    ds = ds.repartition(target_num_rows_per_block=1)
    allowed = allowed_prefixes(plan.input, b.allowed_input_prefixes)
    ds = ds.map_batches(decode_batch, batch_size=1, batch_format="pyarrow", num_cpus=b.cpus_per_io_task,
                        fn_kwargs={"config_json": config_json, "allowed": allowed}, udf_modifying_row_count=False)
    # The config rides on a subclass rather than in constructor args: Ray keeps constructor args in
    # the object store, and a restarted actor (max_restarts=-1) would need them there (ray#53727).
    # Ray Data's defaults (max_restarts=-1, max_task_retries=-1) stay: the job's attempt ledger bounds
    # each group's attempts (capray.batch.attempts), and node losses still heal.
    configured = type(actor_cls.__name__, (actor_cls,), {"CONFIG_JSON": config_json, "LEDGER_NAME": ledger_name})
    ds = ds.map_batches(configured, batch_size=b.groups_per_batch, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=b.num_actors),
                        **actor_pool_args(b), udf_modifying_row_count=False)
    ds = ds.map_batches(write_batch, batch_size=1, batch_format="pyarrow", num_cpus=b.cpus_per_io_task,
                        fn_kwargs={"config_json": config_json, "output": plan.output},
                        udf_modifying_row_count=False)
    return ds


def run_job(plan: Plan, cfg: CaprayConfig, *, actor_cls: type = ProtectActor,
            on_result: Callable[[dict[str, Any]], None] | None = None, show_progress: bool = True) -> JobSummary:
    """Run the pending identities of `plan` on the connected Ray cluster and return the counts."""
    progress = Progress(plan.total, plan.skipped, enabled=show_progress)
    metrics = JobMetrics(cfg.cap.ratio_max, cfg.batch.metrics_port)
    metrics.remaining.set(progress.remaining)
    committed: set[str] = set()
    reasons: dict[str, str] = {}  # identities whose row could not be committed, and why
    unfinished: list[tuple[str, str]] = []
    if plan.pending:
        with job_ledger() as ledger_name:
            for summary in build_dataset(plan, cfg, actor_cls, ledger_name).iter_rows():
                if not summary["committed"]:
                    reasons[summary["identity"]] = summary["error"]
                    continue
                committed.add(summary["identity"])
                progress.update(summary["status"])
                metrics.observe(summary, progress.remaining)
                if on_result is not None:
                    on_result(summary)
        if progress.remaining:
            written, unfinished = settle_missing(plan.pending, committed, reasons, cfg, plan.output)
            for _ in written:
                progress.update("failed")
                metrics.identities.labels(status="failed").inc()
    progress.finish()
    fs, path = get_fs(join(plan.output, "metrics.prom"), cfg.batch.storage_options)
    write_bytes_atomic(fs, path, metrics.text())
    return JobSummary(plan.total, plan.skipped, progress.ok, progress.failed, progress.remaining, plan.output,
                      [identity for identity, _ in unfinished])
