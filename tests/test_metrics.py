"""capray's metrics: one module of definitions, Prometheus naming, fixed buckets Ray accepts (no Ray started)."""

from __future__ import annotations

import re

import pytest

from capray import metrics


@pytest.mark.parametrize("d", metrics.ALL, ids=lambda d: d.name)
def test_every_metric_is_named_the_prometheus_way(d):
    assert re.fullmatch(r"capray_[a-z0-9_]+", d.name)
    assert d.help.isascii(), "Ray refuses a non-ASCII description"
    assert d.name.endswith("_total") == (d.kind == "counter")  # counters, and only counters, end in _total
    assert not re.search(r"_(ms|milliseconds|minutes|hours|kb|mb|gb|kilobytes|megabytes)(_|$)", d.name)  # base units
    if d.kind == "histogram":
        assert d.buckets and all(b > 0 for b in d.buckets), "Ray wants positive boundaries"
        assert list(d.buckets) == sorted(set(d.buckets)), "fixed, increasing buckets"
    else:
        assert d.buckets == ()


def test_names_are_defined_once():
    names = [d.name for d in metrics.ALL]
    assert len(names) == len(set(names))
    defined = {v.name for v in vars(metrics).values() if isinstance(v, metrics.MetricDef)}
    assert defined == set(names), "every definition is listed in metrics.ALL"


def test_the_lambda_buckets_resolve_every_smoke_ratio_and_every_tenth_paper_ratio():
    smoke, paper = range(0, 11), range(0, 101, 10)
    edges = set(metrics.LAMBDA_BUCKETS)
    assert all(r in edges or r == 0 for r in [*smoke, *paper]) and min(edges) < 1


def test_a_serve_metric_is_recorded_without_a_snapshot():
    m = metrics.Metric(metrics.SERVE_GROUPS)
    m.inc(outcome="ok")  # Ray not started: recorded nowhere, and no error
    m.declare(outcome="busy")
