"""Progress display and Prometheus metrics of a protect job (no Ray needed)."""

from __future__ import annotations

import io

from capray.batch.metrics import JobMetrics
from capray.batch.progress import Progress


def test_progress_counts_and_eta():
    stream = io.StringIO()
    p = Progress(total=10, skipped=2, stream=stream, interval=0.0)
    assert p.remaining == 8 and p.eta_seconds() is None
    p.update("ok")
    p.update("failed")
    assert (p.ok, p.failed, p.remaining) == (1, 1, 6)
    assert p.eta_seconds() is not None and p.eta_seconds() >= 0
    last = stream.getvalue().strip().splitlines()[-1]
    assert "1 ok, 1 failed, 6 remaining of 10 (+2 already done)" in last and "ETA" in last


def test_progress_while_listing_has_no_total_then_counts_from_the_workers():
    stream = io.StringIO()
    p = Progress(stream=stream, interval=0.0)
    p.update("ok")
    assert p.remaining is None and p.eta_seconds() is None
    p.listed({"listed": 40, "skipped_ok": 5, "skipped_input": 2})
    assert "1 ok, 0 failed, 40 listed so far (+7 already done)" in p.line() and "ETA ?" in p.line()
    p.listed({"listed": 50, "skipped_ok": 5, "skipped_input": 2}, final=True)
    assert p.remaining == 50 - 7 - 1 and p.eta_seconds() is not None


def test_metrics_count_statuses_rates_and_lambdas():
    m = JobMetrics()
    m.observe({"status": "ok", "seconds": 3.0, "engine_seconds": 2.0, "pgd_steps": 8, "lambdas": [0.0, 4.0, 10.0]}, 2)
    m.observe({"status": "failed", "seconds": 0.1, "engine_seconds": None, "pgd_steps": None, "lambdas": []}, 1)
    text = m.text().decode()
    assert 'capray_identities_total{status="ok"} 1.0' in text
    assert 'capray_identities_total{status="failed"} 1.0' in text
    assert "capray_identities_remaining 1.0" in text
    assert "capray_pgd_steps_per_second_sum 4.0" in text  # 8 steps / 2 s
    assert "capray_chosen_lambda_count 3.0" in text and "capray_chosen_lambda_sum 14.0" in text
    assert 'capray_chosen_lambda_bucket{le="4.0"} 2.0' in text
    assert "capray_identity_duration_seconds_count 2.0" in text


def test_a_retried_task_reporting_the_same_work_again_is_counted_once():
    """A rerun check task must not inflate `skipped`, or a lost identity would hide behind counts that add up."""
    from capray.batch.tally import Tally

    tally = Tally()
    tally.add("check:3:a:c", skipped_ok=2, skipped_input=1)
    tally.add("check:3:a:c", skipped_ok=2, skipped_input=1)  # the same batch, from a retried task
    tally.add("check:2:d:e", skipped_ok=1, quarantined=1)
    tally.add("check:2:d:e", skipped_ok=1, quarantined=1)
    assert tally.snapshot() == {"skipped_ok": 3, "skipped_input": 1, "quarantined": 1}
