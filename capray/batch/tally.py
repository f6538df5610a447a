"""Counts the driver cannot see in the result stream: identities the check stage found done.

The sweep hands the driver its own counts with each slice; identities it could not decide (catalog
rows without size/ETag, a platform's own Dataset) are decided in the check tasks, and only pending
identities flow on to the GPU stage, so those skipped there are counted here instead: one small Ray
actor, one call per check batch, read by the driver for the progress line and the final summary.

Every report carries a key naming the piece of work it counts (a check batch), and a key is counted
once: Ray Data reruns a task whose worker died, and a rerun's second report must not inflate
`skipped`, which would hide an unfinished identity behind a count that adds up.
"""

from __future__ import annotations

from typing import Any

VERDICTS = ("skipped_ok", "skipped_input", "quarantined")


class Tally:
    def __init__(self):
        self.counts: dict[str, int] = dict.fromkeys(VERDICTS, 0)
        self.seen: set[str] = set()  # report keys already counted (~40 k for 10 M identities)

    def add(self, key: str, **counts: int) -> None:
        if key in self.seen:  # the same work reported again by a retried task
            return
        self.seen.add(key)
        for name, value in counts.items():
            self.counts[name] = self.counts.get(name, 0) + value

    def snapshot(self) -> dict[str, Any]:
        return dict(self.counts)


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
