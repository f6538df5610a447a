"""Counts the driver cannot see in the result stream: identities listed and skipped inside workers.

Listing and the done-check run in distributed tasks and only pending identities flow on to the GPU
stage, so the skipped ones are counted here instead: one small Ray actor, one call per listing batch
(a few per 1,000 identities), read by the driver for the progress line and the final summary.

Every report carries a key naming the piece of work it counts (a listing page, a check batch), and
a key is counted once: Ray Data reruns a task whose worker died, and a rerun's second report must not
inflate `skipped`, which would hide an unfinished identity behind a count that adds up.
"""

from __future__ import annotations

from typing import Any

MAX_SAMPLES = 20


class Tally:
    def __init__(self):
        self.counts: dict[str, int] = {"listed": 0, "skipped_ok": 0, "skipped_input": 0, "quarantined": 0,
                                       "ignored": 0, "sources_done": 0}
        self.ignored_sample: list[str] = []
        self.source_errors: list[str] = []
        self.seen: set[str] = set()  # report keys already counted (~40 k for 10 M identities)

    def add(self, key: str, ignored: list[str] | None = None, source_error: str | None = None,
            **counts: int) -> None:
        if key in self.seen:  # the same work reported again by a retried task
            return
        self.seen.add(key)
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

    from capray.cluster import ON_HEAD_NODE

    return ray.remote(num_cpus=0)(Tally).options(**ON_HEAD_NODE).remote()


def report(tally, key: str, **counts: Any) -> None:
    """Add to the tally from a worker and wait, so a finished task's counts are in before the job ends.

    `key` names the work counted, the same in a retried task (see the module docstring).
    """
    import ray

    if tally is not None:
        ray.get(tally.add.remote(key, **counts))
