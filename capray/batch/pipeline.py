"""`capray protect`'s run: a sweep over the library, one bounded slice at a time, through the processor.

    sweep (an actor: listing + committed state, range by range) → slice of candidates
    → processor: check → decode → protect → write → commit → summaries → driver

Each slice (`batch.slice_identities` identities to do) is its own Ray Data execution: Ray Data keeps
~10 KB on the driver per one-identity block for the life of an execution, so a library executed in
one would grow the driver without bound; in slices it stays flat, and the first commit comes as
soon as the first slice is listed, whatever the library's size. The sweep lists the next slice while
this one runs. The driver holds no list of identities, only counts and the sweep's cursor.

A run may be time-boxed (`batch.max_run_seconds`) or stopped by SIGTERM (`capray/batch/stopping.py`):
it then saves where its sweep stopped (`OUT/manifest/_sweep.json`), and the next run starts there,
wrapping around at the end of the library, so every identity gets its turn night after night.
At the end the run's commit files are compacted (`capray/batch/compact.py`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from capray.batch.memory import release_freed_memory
from capray.batch.metrics import JobMetrics
from capray.batch.plan import Plan, write_run_file
from capray.batch.processor import Processor
from capray.batch.progress import Progress
from capray.batch.settle import NAMES_KEPT, report_uncommitted
from capray.batch.stages import ProtectStage
from capray.batch.stopping import RunStop
from capray.batch.sweep import Sweep, read_cursor, write_cursor
from capray.batch.tally import VERDICTS, start_tally
from capray.config import CaprayConfig
from capray.exit_codes import EXIT_FAILED, EXIT_INPUT_FAILED, EXIT_OK
from capray.io.allowlist import allowed_prefixes
from capray.io.lease import check_fence
from capray.io.storage import get_fs, join, write_bytes_atomic

log = logging.getLogger(__name__)
TALLY_POLL_S = 2.0
SWEEP_COUNTS = ("listed", "skipped_ok", "skipped_input", "quarantined", "deletions")


@dataclass
class JobSummary:
    total: int  # identities listed
    skipped: int  # already ok with unchanged input
    ok: int
    failed: int  # failed in this run (input + transient)
    unfinished: int  # listed but neither skipped nor committed: deferred by a stop, or a stage dropped them
    output: str
    failed_input: int = 0  # of `failed`: the input's fault (not retried until it changes)
    skipped_input: int = 0  # failed for their input before, input unchanged: not retried
    source_errors: list[str] = field(default_factory=list)  # catalog files or the listing unusable
    fail_on_input_errors: bool = False
    unfinished_identities: list[str] = field(default_factory=list)  # the ones known by name (first 1,000)
    quarantined: int = 0  # failed transiently batch.quarantine_after runs in a row: skipped (--retry-quarantined)
    deleted: int = 0  # removed from the input: their outputs were removed
    stopped: str | None = None  # why the run stopped before its sweep was over (time box, SIGTERM)

    @property
    def failed_transient(self) -> int:
        return self.failed - self.failed_input

    @property
    def exit_code(self) -> int:
        """0 nothing a rerun could fix; 1 a rerun retries or continues something; 3 input failures and
        asked to fail on them."""
        if self.failed_transient or self.unfinished or self.source_errors or self.stopped:
            return EXIT_FAILED
        if self.fail_on_input_errors and (self.failed_input or self.skipped_input):
            return EXIT_INPUT_FAILED
        return EXIT_OK


class _Results:
    """What the driver counts from the summary rows of every slice."""

    def __init__(self, cfg: CaprayConfig, progress: Progress, on_result):
        self.progress, self.on_result = progress, on_result
        self.metrics = JobMetrics(cfg.batch.metrics_port)
        self.failed_input = self.deleted = self.deferred = self.n_uncommitted = 0
        self.uncommitted: list[tuple[str, str]] = []

    def add(self, summary: dict[str, Any]) -> None:
        if summary["deferred"]:
            self.deferred += 1
            return
        if not summary["committed"]:  # no row or no state: named at the end, counted unfinished
            self.n_uncommitted += 1
            if len(self.uncommitted) < NAMES_KEPT:
                self.uncommitted.append((summary["identity"], summary["error"]))
            return
        if summary["status"] == "deleted":
            self.deleted += 1
        else:
            self.failed_input += summary["status"] != "ok" and summary["failure_class"] == "input"
            self.progress.update(summary["status"])
            self.metrics.observe(summary, self.progress.remaining or 0)
        if self.on_result is not None:
            self.on_result(summary)


def run_job(plan: Plan, cfg: CaprayConfig, *, protect_stage: type = ProtectStage,
            on_result: Callable[[dict[str, Any]], None] | None = None, show_progress: bool = True) -> JobSummary:
    """Run `plan` (folder or catalog input) on the connected Ray cluster; returns the counts."""
    import ray

    from capray.batch.compact import compact

    b, so = cfg.batch, cfg.batch.storage_options
    if plan.resuming:  # a stopped run's commit files become a delta first: the sweep reads only indexed files
        compact(plan.output, cfg)
    tally = start_tally()
    progress = Progress(enabled=show_progress)
    results = _Results(cfg, progress, on_result)
    counts = dict.fromkeys(SWEEP_COUNTS, 0)
    order = "folder" if plan.kind == "folder" else "catalog"
    cursor = read_cursor(plan.output, so)
    after = cursor.get("after") if cursor.get("order") == order else None
    sweep = ray.remote(Sweep).options(num_cpus=b.cpus_per_io_task).remote(
        plan.kind, plan.input, plan.catalog_files, plan.output, cfg.model_dump_json(), after, b.retry_quarantined)
    sweep_info: dict[str, Any] = {"source_errors": [], "ignored_count": 0, "ignored_sample": []}
    allowed = allowed_prefixes(plan.input, b.allowed_input_prefixes)
    started = time.monotonic()
    with Processor.start(cfg, plan, allowed, tally, protect_stage) as processor, \
            RunStop(b.max_run_seconds, b.stop_grace_s, processor.stop) as stop:
        try:
            finished, position = _sweep(plan, processor, sweep, stop, results, tally, progress, counts,
                                        sweep_info, order, after)
        except KeyboardInterrupt:  # the grace period ended while the driver was between two slices
            if not stop.grace_expired:
                raise
            finished, position = False, sweep_info.get("position", after)
    sweep_seconds = time.monotonic() - started
    ray.kill(sweep)
    tally_counts = ray.get(tally.snapshot.remote())
    for key in VERDICTS:
        counts[key] += tally_counts[key]  # decided in the check stage (catalog rows without size/ETag)
    progress.listed(counts, final=True)
    progress.finish()
    errors = list(sweep_info["source_errors"])
    skipped = counts["skipped_ok"] + counts["skipped_input"] + counts["quarantined"]
    done = skipped + progress.ok + progress.failed
    summary = JobSummary(counts["listed"], counts["skipped_ok"], progress.ok, progress.failed,
                         max(0, counts["listed"] - done), plan.output, results.failed_input, counts["skipped_input"],
                         errors, b.fail_on_input_errors,
                         report_uncommitted(results.uncommitted, results.n_uncommitted),
                         counts["quarantined"], results.deleted, stop.reason if not finished else None)
    results.metrics.remaining.set(summary.unfinished)
    fs, path = get_fs(join(plan.output, "metrics.prom"), so)
    write_bytes_atomic(fs, path, results.metrics.text())
    compaction = None
    if plan.fence is not None:  # the driver's last writes too: only while OUTPUT's lease is this job's
        _check_fence_with_retries(plan.fence, so)
    if b.compact_at_end and (progress.ok or progress.failed or results.deleted):
        try:
            compaction = compact(plan.output, cfg)
        except Exception as exc:  # every row is committed already: compaction only tidies the files
            log.error("compacting the manifest failed (%s: %s); the rows are all there, run "
                      "`capray manifest compact %s` to compact them", type(exc).__name__, exc, plan.output)
    write_run_file(plan, cfg, {"totals": {
        "identities": summary.total, "ok": summary.ok, "failed": summary.failed,
        "failed_input": results.failed_input, "skipped_ok": summary.skipped, "skipped_input": summary.skipped_input,
        "quarantined": summary.quarantined, "deleted": summary.deleted, "unfinished": summary.unfinished,
        "deferred": results.deferred, "stopped": summary.stopped, "sweep_finished": finished,
        "sweep_seconds": round(sweep_seconds, 3),
        "sweep_position": position, "ignored_input_entries": sweep_info["ignored_count"], "source_errors": errors,
        "manifest_files": compaction.files_after if compaction else None,
        "compaction": None if compaction is None else {
            "full": compaction.full, "bytes_written": compaction.bytes_written,
            "manifest_bytes": compaction.manifest_bytes}},
        "ignored_input_sample": sweep_info["ignored_sample"]})
    return summary


def _run_slice(processor: Processor, candidates, results: _Results, tally, progress: Progress,
               counts: dict[str, int], stop: RunStop) -> None:
    """One slice's Ray Data execution, its summaries counted as they come."""
    import ray

    last_poll = 0.0
    try:
        for summary in processor(candidates).iter_rows():
            results.add(summary)
            if time.monotonic() - last_poll > TALLY_POLL_S:
                last_poll = time.monotonic()
                snapshot = ray.get(tally.snapshot.remote())
                progress.listed({k: counts[k] + snapshot.get(k, 0) for k in ("listed", "skipped_ok", "skipped_input")})
    except KeyboardInterrupt:
        if not stop.grace_expired:
            raise
    finally:
        release_freed_memory()  # the execution's per-block state is freed now: keep the driver flat


def _check_fence_with_retries(fence: dict[str, Any], so: dict[str, Any], attempts: int = 4) -> None:
    """`check_fence`, a transient storage error retried with backoff (a lost lease is never retried)."""
    from capray.io.storage import is_transient

    for attempt in range(attempts):
        try:
            return check_fence(fence, storage_options=so)
        except OSError as exc:
            if not is_transient(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.5 * 2**attempt)


def _sweep(plan: Plan, processor: Processor, sweep, stop: RunStop, results: _Results, tally, progress: Progress,
           counts: dict[str, int], sweep_info: dict[str, Any], order: str, after: str | None) -> tuple[bool, Any]:
    """Slice after slice until the sweep is over or the run stops; returns (sweep over, position)."""
    import ray

    so = processor.cfg.batch.storage_options
    position = sweep_info["position"] = after
    pending = sweep.next_slice.options(num_returns=2).remote()
    while not stop.stopping:
        table_ref, info_ref = pending
        try:
            info = ray.get(info_ref)
        except ray.exceptions.RayError as exc:  # the listing failed: the next run starts here again
            sweep_info["source_errors"].append(f"listing the input failed: {exc}")
            log.error("listing the input failed; the run stops here: %s", exc)
            break
        sweep_info.update({k: info[k] for k in ("source_errors", "ignored_count", "ignored_sample")})
        for key in SWEEP_COUNTS:
            counts[key] += info[key]
        if not info["finished"]:  # list the next slice while this one runs
            pending = sweep.next_slice.options(num_returns=2).remote()
        deferred_before = results.deferred
        if info["todo"]:
            _run_slice(processor, ray.data.from_arrow_refs([table_ref]), results, tally, progress, counts, stop)
        if stop.grace_expired or results.deferred > deferred_before:
            break  # this slice is not over: the next run starts at its beginning
        if info["hi"] != position:  # a sweep that came full circle leaves the cursor where it was
            write_cursor(plan.output, so, {"order": order, "after": info["hi"]})
        position = sweep_info["position"] = info["hi"]
        if info["finished"]:
            return True, position
    return False, position
