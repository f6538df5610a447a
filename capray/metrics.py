"""Every capray metric, defined once here and recorded one way: Ray's metrics API (`ray.util.metrics`).

Why Ray's API, for the batch driver and the Serve app alike:
* Serve replicas are many processes behind one proxy. A prometheus_client port in each replica
  could not be scraped through the Service; what a process records through `ray.util.metrics` is
  exported by its node's Ray metrics agent (port 8080), which the pods' scrape annotations and
  KubeRay's PodMonitor already cover, next to Ray's and Serve's own metrics.
* The batch driver is a Ray driver once connected, so its metrics leave the same way (from the
  head pod of a RayJob), and one dashboard queries one family of names for both front doors.
Ray adds its namespace when it exports: `capray_identities_total` is scraped as
`ray_capray_identities_total`. (Ray's histogram `_sum` is built from bucket midpoints.)

A run also leaves its numbers behind: `JobMetrics` keeps the same observations in a private
registry, written as `OUT/metrics.prom` (Prometheus text, exact sums) at the end of a run and served
on `batch.metrics_port` when set, for a driver that no metrics agent scrapes (a laptop's embedded
Ray ends with the run). That is a copy of these definitions, not a second set of them.

Names follow Prometheus: counters end in `_total`, values are in base units (`_seconds`), and the
buckets are fixed here, so runs, replicas and nodes aggregate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

SECONDS_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 3600)
RATE_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100)
# λ is an integer in 0..cap.ratio_max (10 for smoke, 100 for paper): every value up to 10, then every 10th;
# Ray wants positive boundaries, so λ = 0 is the 0.5 bucket.
LAMBDA_BUCKETS = (0.5, *range(1, 10), *range(10, 101, 10), 200, 500, 1000)


@dataclass(frozen=True)
class MetricDef:
    name: str
    help: str
    kind: Literal["counter", "gauge", "histogram"]
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


IDENTITIES = MetricDef("capray_identities_total", "identities finished, by status (ok, failed)", "counter",
                       ("status",))
IDENTITIES_REMAINING = MetricDef("capray_identities_remaining", "identities still to do in this run", "gauge")
IDENTITY_DURATION = MetricDef("capray_identity_duration_seconds", "wall time per identity, decode to commit",
                              "histogram", buckets=SECONDS_BUCKETS)
PGD_STEPS_RATE = MetricDef("capray_pgd_steps_per_second", "PGD steps per engine second, per identity", "histogram",
                           buckets=RATE_BUCKETS)
CHOSEN_LAMBDA = MetricDef("capray_chosen_lambda",  # Ray takes ASCII descriptions only: "lambda", not the letter
                          "lambda chosen by CAP's dynamic ratio search, per PGD step", "histogram",
                          buckets=LAMBDA_BUCKETS)
LAMBDA_COLLAPSED = MetricDef("capray_lambda_collapsed_total", "protected groups whose lambda search stopped "
                             "choosing (most searched steps had at most 2 distinct candidates)", "counter")
SERVE_GROUPS = MetricDef("capray_serve_groups_total", "protection requests finished, by outcome (ok, failed, busy)",
                         "counter", ("outcome",))

ALL = (IDENTITIES, IDENTITIES_REMAINING, IDENTITY_DURATION, PGD_STEPS_RATE, CHOSEN_LAMBDA, LAMBDA_COLLAPSED,
       SERVE_GROUPS)


class Metric:
    """One metric recorded through Ray (exported by the node's metrics agent) and, when `registry` is
    given, into that prometheus_client registry too (the batch driver's snapshot).

    `serve=True` in a Serve replica: `ray.serve.metrics` (the same API) adds the deployment, replica,
    application and route tags.
    """

    def __init__(self, definition: MetricDef, registry: Any = None, *, serve: bool = False):
        if serve:
            from ray.serve import metrics as ray_metrics
        else:
            from ray.util import metrics as ray_metrics

        d = self.definition = definition
        if d.kind == "histogram":
            self._ray = ray_metrics.Histogram(d.name, description=d.help, boundaries=[float(b) for b in d.buckets],
                                              tag_keys=d.labels)
        else:
            cls = ray_metrics.Counter if d.kind == "counter" else ray_metrics.Gauge
            self._ray = cls(d.name, description=d.help, tag_keys=d.labels)
        self._copy = None if registry is None else _prometheus_copy(d, registry)

    def inc(self, value: float = 1.0, **labels: str) -> None:
        self._ray.inc(value, tags=labels or None)
        if self._copy is not None:
            self._series(labels).inc(value)

    def set(self, value: float, **labels: str) -> None:
        self._ray.set(value, tags=labels or None)
        if self._copy is not None:
            self._series(labels).set(value)

    def observe(self, value: float, **labels: str) -> None:
        self._ray.observe(value, tags=labels or None)
        if self._copy is not None:
            self._series(labels).observe(value)

    def declare(self, **labels: str) -> None:
        """Show this label set at 0 in the snapshot before anything happens (Ray cannot record a zero increment)."""
        if self._copy is not None:
            self._series(labels)

    def _series(self, labels: dict[str, str]):
        return self._copy.labels(**labels) if labels else self._copy


def _prometheus_copy(d: MetricDef, registry: Any):
    from prometheus_client import Counter, Gauge, Histogram

    if d.kind == "histogram":
        return Histogram(d.name, d.help, d.labels, buckets=(*d.buckets, float("inf")), registry=registry)
    return (Counter if d.kind == "counter" else Gauge)(d.name, d.help, d.labels, registry=registry)


class JobMetrics:
    """The batch job's metrics, kept on the driver from the stream of finished identities.

    The driver sees every identity's summary row, so it alone can count the whole job; the workers record
    nothing. The λ buckets are fixed (`LAMBDA_BUCKETS`), whatever `cap.ratio_max` is, so runs aggregate.
    """

    def __init__(self, port: int | None = None):
        from prometheus_client import CollectorRegistry, start_http_server

        self.registry = CollectorRegistry()
        self.identities = Metric(IDENTITIES, self.registry)
        self.remaining = Metric(IDENTITIES_REMAINING, self.registry)
        self.seconds = Metric(IDENTITY_DURATION, self.registry)
        self.steps_rate = Metric(PGD_STEPS_RATE, self.registry)
        self.lambdas = Metric(CHOSEN_LAMBDA, self.registry)
        self.collapsed = Metric(LAMBDA_COLLAPSED, self.registry)
        self.collapsed.declare()
        for status in ("ok", "failed"):
            self.identities.declare(status=status)
        if port:
            start_http_server(port, registry=self.registry)

    def observe(self, summary: dict[str, Any], remaining: int) -> None:
        self.identities.inc(status=summary["status"])
        self.remaining.set(remaining)
        if summary.get("seconds") is not None:
            self.seconds.observe(summary["seconds"])
        steps, engine_s = summary.get("pgd_steps"), summary.get("engine_seconds")
        if steps and engine_s:
            self.steps_rate.observe(steps / engine_s)
        for lam in summary.get("lambdas") or []:
            self.lambdas.observe(lam)
        if summary.get("lambda_collapsed"):
            self.collapsed.inc()

    def text(self) -> bytes:
        """The snapshot in the Prometheus text format (`OUT/metrics.prom`)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
