"""A one-line progress display: identities done / failed / remaining, rate and ETA."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts results as they arrive; prints at most every `interval` seconds (and at the end)."""

    def __init__(self, total: int, skipped: int = 0, stream: TextIO | None = None, interval: float = 2.0,
                 enabled: bool = True):
        self.total, self.skipped = total, skipped
        self.ok = self.failed = 0
        self.stream = stream or sys.stderr
        self.interval, self.enabled = interval, enabled
        self.start = time.monotonic()
        self._last = 0.0
        self._printed: str | None = None

    @property
    def remaining(self) -> int:
        return self.total - self.skipped - self.ok - self.failed

    def eta_seconds(self) -> float | None:
        finished = self.ok + self.failed
        if not finished:
            return None
        return (time.monotonic() - self.start) / finished * self.remaining

    def line(self) -> str:
        eta = self.eta_seconds()
        skipped = f" (+{self.skipped} already ok)" if self.skipped else ""
        return (f"capray protect: {self.ok} ok, {self.failed} failed, {self.remaining} remaining of "
                f"{self.total}{skipped} | elapsed {_clock(time.monotonic() - self.start)} | ETA "
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
        if self.enabled and (self._printed is None or self.remaining or self.ok + self.failed == 0):
            self._print()
