"""Prometheus metrics of a protect job, kept on the driver from the stream of finished identities.

The driver sees every identity's summary row, so one registry there gives the whole job's numbers
without a metrics agent on the workers. Served over HTTP when `batch.metrics_port` is set (scrape it
from the RayJob's head pod) and written as `OUT/metrics.prom` (Prometheus text format) at the end.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

SECONDS_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 3600, float("inf"))
RATE_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, float("inf"))


class JobMetrics:
    def __init__(self, ratio_max: int = 100, port: int | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.identities = Counter("capray_identities", "identities finished, by status", ["status"], registry=r)
        self.remaining = Gauge("capray_identities_remaining", "identities still to do in this run", registry=r)
        self.seconds = Histogram("capray_identity_seconds", "wall seconds per identity (decode to commit)",
                                 buckets=SECONDS_BUCKETS, registry=r)
        self.steps_rate = Histogram("capray_pgd_steps_per_second", "PGD steps per engine second, per identity",
                                    buckets=RATE_BUCKETS, registry=r)
        step = max(1, ratio_max // 10)
        lam_buckets = tuple(float(b) for b in range(0, ratio_max + 1, step)) + (float("inf"),)
        self.lambdas = Histogram("capray_chosen_lambda", "λ chosen by CAP's dynamic ratio search, per PGD step",
                                 buckets=lam_buckets, registry=r)
        for status in ("ok", "failed"):
            self.identities.labels(status=status)
        if port:
            start_http_server(port, registry=r)

    def observe(self, summary: dict[str, Any], remaining: int) -> None:
        self.identities.labels(status=summary["status"]).inc()
        self.remaining.set(remaining)
        if summary.get("seconds") is not None:
            self.seconds.observe(summary["seconds"])
        steps, engine_s = summary.get("pgd_steps"), summary.get("engine_seconds")
        if steps and engine_s:
            self.steps_rate.observe(steps / engine_s)
        for lam in summary.get("lambdas") or []:
            self.lambdas.observe(lam)

    def text(self) -> bytes:
        return generate_latest(self.registry)
