"""How long to wait before asking again: the server's Retry-After when it gives one, else jittered back-off.

Jitter keeps many clients refused at the same moment (a full queue) from all coming back at the same moment.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Mapping

MAX_RETRY_AFTER_S = 60.0  # a hint beyond this is capped: the caller's own bound decides longer waits
MIN_RETRY_AFTER_S = 0.5  # "Retry-After: 0" must not become a busy loop
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """The Retry-After header (delta-seconds or an HTTP date) in seconds, capped; None when absent or unreadable."""
    raw = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    if raw is None or not raw.strip():
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(raw).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, MIN_RETRY_AFTER_S), MAX_RETRY_AFTER_S)


def backoff_seconds(attempt: int, rng: random.Random | None = None) -> float:
    """Exponential back-off for the `attempt`-th retry (0-based), with jitter in [50 %, 100 %] of the step."""
    step = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** attempt)
    return step * (rng or random).uniform(0.5, 1.0)
