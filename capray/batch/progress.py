"""A one-line progress display: identities done / failed / skipped / listed so far, rate and ETA.

The library is listed while the job runs, so the total is known only once listing has finished;
until then the line shows how many identities have been listed so far, and no ETA.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts results as they arrive; prints at most every `interval` seconds (and at the end)."""

    def __init__(self, total: int | None = None, skipped: int = 0, stream: TextIO | None = None,
                 interval: float = 2.0, enabled: bool = True):
        self.total, self.skipped = total, skipped  # total None: still listing
        self.listed_so_far = total or 0
        self.ok = self.failed = 0
        self.stream = stream or sys.stderr
        self.interval, self.enabled = interval, enabled
        self.start = time.monotonic()
        self._last = 0.0
        self._printed: str | None = None

    @property
    def remaining(self) -> int | None:
        if self.total is None:
            return None
        return self.total - self.skipped - self.ok - self.failed

    def listed(self, counts: dict[str, Any], final: bool = False) -> None:
        """Listing counts from the workers (`capray/batch/tally.py`); `final` once listing is over."""
        self.listed_so_far = counts["listed"]
        self.skipped = counts["skipped_ok"] + counts["skipped_input"]
        if final:
            self.total = counts["listed"]

    def eta_seconds(self) -> float | None:
        finished, remaining = self.ok + self.failed, self.remaining
        if not finished or remaining is None:
            return None
        return (time.monotonic() - self.start) / finished * remaining

    def line(self) -> str:
        eta = self.eta_seconds()
        skipped = f" (+{self.skipped} already done)" if self.skipped else ""
        if self.total is None:
            head = f"{self.ok} ok, {self.failed} failed, {self.listed_so_far} listed so far{skipped}"
        else:
            head = f"{self.ok} ok, {self.failed} failed, {self.remaining} remaining of {self.total}{skipped}"
        return (f"capray protect: {head} | elapsed {_clock(time.monotonic() - self.start)} | ETA "
                f"{_clock(eta) if eta is not None else '?'}")

    def update(self, status: str) -> None:
        if status == "ok":
            self.ok += 1
        else:
            self.failed += 1
        now = time.monotonic()
        if self.enabled and (now - self._last >= self.interval or self.remaining == 0):
            self._last = now
            self._print()

    def _print(self) -> None:
        self._printed = self.line()
        print(self._printed, file=self.stream, flush=True)

    def finish(self) -> None:
        if self.enabled:
            self._print()
