"""The protect job's metrics: defined with every other capray metric in `capray.metrics`."""

from capray.metrics import JobMetrics  # noqa: F401
