"""Counts the driver cannot see in the result stream: identities listed and skipped inside workers.

Listing and the done-check run in distributed tasks and only pending identities flow on to the GPU
stage, so the skipped ones are counted here instead: one small Ray actor, one call per listing batch
(a few per 1,000 identities), read by the driver for the progress line and the final summary.
"""

from __future__ import annotations

from typing import Any

MAX_SAMPLES = 20


class Tally:
    def __init__(self):
        self.counts: dict[str, int] = {"listed": 0, "skipped_ok": 0, "skipped_input": 0, "ignored": 0,
                                       "sources_done": 0}
        self.ignored_sample: list[str] = []
        self.source_errors: list[str] = []

    def add(self, ignored: list[str] | None = None, source_error: str | None = None, **counts: int) -> None:
        for key, value in counts.items():
            self.counts[key] = self.counts.get(key, 0) + value
        for uri in ignored or []:
            self.counts["ignored"] += 1
            if len(self.ignored_sample) < MAX_SAMPLES:
                self.ignored_sample.append(uri)
        if source_error and len(self.source_errors) < MAX_SAMPLES:
            self.source_errors.append(source_error)

    def snapshot(self) -> dict[str, Any]:
        return {**self.counts, "ignored_sample": list(self.ignored_sample), "source_errors": list(self.source_errors)}


def start_tally():
    import ray

    return ray.remote(num_cpus=0)(Tally).remote()


def report(tally, **counts: Any) -> None:
    """Add to the tally from a worker and wait, so a finished task's counts are in before the job ends."""
    import ray

    if tally is not None:
        ray.get(tally.add.remote(**counts))
