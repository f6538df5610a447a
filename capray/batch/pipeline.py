"""`capray protect`'s run: the listing stage in front of the processor, driven and summarised here.

    listing (root pages | catalog files) → processor: check → decode → protect → write → commit
    → summaries → driver

The driver holds no list of identities: it iterates small summary rows, and listing and the
done-check run in tasks, so its memory and its time to the first commit do not grow with the
library. Resume and incremental runs are the done-check: an identity whose committed state has the
same input fingerprint and says `ok` (or failed for its input) is skipped. At the end the manifest
is compacted (`capray/batch/compact.py`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from capray.batch.metrics import JobMetrics
from capray.batch.plan import Plan, write_run_file
from capray.batch.processor import Processor
from capray.batch.progress import Progress
from capray.batch.settle import NAMES_KEPT, report_uncommitted
from capray.batch.stages import ProtectStage
from capray.batch.stages.listing import candidates
from capray.config import CaprayConfig
from capray.exit_codes import EXIT_FAILED, EXIT_INPUT_FAILED, EXIT_OK
from capray.io.allowlist import allowed_prefixes
from capray.io.storage import get_fs, join, write_bytes_atomic

log = logging.getLogger(__name__)
TALLY_POLL_S = 2.0


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


def run_job(plan: Plan, cfg: CaprayConfig, *, protect_stage: type = ProtectStage,
            on_result: Callable[[dict[str, Any]], None] | None = None, show_progress: bool = True) -> JobSummary:
    """Run `plan` on the connected Ray cluster: protect what is not done, compact, return the counts."""
    import ray

    from capray.batch.compact import compact
    from capray.batch.tally import start_tally

    tally = start_tally()
    progress = Progress(enabled=show_progress)
    metrics = JobMetrics(cfg.batch.metrics_port)
    failed_input, last_poll, uncommitted, n_uncommitted = 0, 0.0, [], 0
    # The scoring pool (sharding on) belongs to this driver: protect actors borrow from it, never wait on it.
    allowed = allowed_prefixes(plan.input, cfg.batch.allowed_input_prefixes)
    with Processor.start(cfg, plan, allowed, tally, protect_stage) as processor:
        for summary in processor(candidates(plan, cfg, tally)).iter_rows():
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
    expected_sources = 1 if plan.kind == "folder" else len(plan.catalog_files)
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
            log.error("compacting the manifest failed (%s: %s); the rows are all there, run "
                      "`capray manifest compact %s` to compact them", type(exc).__name__, exc, plan.output)
    write_run_file(plan, cfg, {"totals": {
        "identities": summary.total, "ok": summary.ok, "failed": summary.failed, "failed_input": failed_input,
        "skipped_ok": summary.skipped, "skipped_input": summary.skipped_input, "unfinished": summary.unfinished,
        "ignored_input_entries": counts["ignored"], "source_errors": errors,
        "manifest_files": compaction.files_after if compaction else None},
        "ignored_input_sample": counts["ignored_sample"]})
    return summary
