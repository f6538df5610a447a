"""When a run stops taking identities: its time box (`batch.max_run_seconds`), SIGTERM (a pod being
stopped), or never.

A stop is graceful: `on_stop` tells the job's attempt ledger, so no group starts after it (the
protect stage gives those back as *deferred*) while the groups already running finish and commit.
If they are still running `batch.stop_grace_s` later, the driver's loop is interrupted and they are
given back unfinished (not committed: the next run redoes them, nothing is done twice). Either way
the run then compacts, saves where its sweep stopped, releases OUTPUT's lease and exits 1.
"""

from __future__ import annotations

import _thread
import logging
import signal
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class RunStop:
    """Arms the time box and the SIGTERM handler (main thread only) for one run; `close()` disarms them."""

    def __init__(self, max_run_seconds: float, grace_s: float, on_stop: Callable[[], None]):
        self.max_run_seconds, self.grace_s, self.on_stop = max_run_seconds, grace_s, on_stop
        self.reason: str | None = None
        self.grace_expired = False
        self._timers: list[threading.Timer] = []
        self._previous_handler = None
        self._lock = threading.Lock()

    def __enter__(self) -> RunStop:
        if self.max_run_seconds:
            self._timer(self.max_run_seconds, lambda: self.request(
                f"time box reached (batch.max_run_seconds={self.max_run_seconds:g})"))
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _timer(self, seconds: float, action: Callable[[], None]) -> None:
        timer = threading.Timer(seconds, action)
        timer.daemon = True
        timer.start()
        self._timers.append(timer)

    def _on_sigterm(self, signum, frame) -> None:
        # a signal handler must not block: the stop itself (a Ray call) runs in a thread
        threading.Thread(target=self.request, args=("SIGTERM received",), daemon=True).start()

    @property
    def stopping(self) -> bool:
        return self.reason is not None

    def request(self, reason: str) -> None:
        """Stop taking identities (once); after the grace period, interrupt the driver's loop."""
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
        log.warning("stopping: %s; groups in flight may finish for %gs (batch.stop_grace_s), the rest is given "
                    "back to the next run", reason, self.grace_s)
        try:
            self.on_stop()
        except Exception as exc:  # the ledger is gone: the grace period still ends the run
            log.warning("telling the protect actors to stop failed (%s: %s)", type(exc).__name__, exc)
        self._timer(self.grace_s, self._grace_over)

    def _grace_over(self) -> None:
        log.warning("the grace period is over: groups still in flight are given back unfinished")
        self.grace_expired = True
        _thread.interrupt_main()

    def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
