"""Where capray keeps what it builds once and reuses (the tiny model, class images): one rule.

An explicit directory wins; otherwise `$CAPRAY_CACHE`; otherwise `~/.cache/capray`. Workers of one
cluster share it through the environment, so the expensive things are built once per machine.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def cache_root(explicit: str | os.PathLike | None = None) -> Path:
    return Path(explicit or os.environ.get("CAPRAY_CACHE") or Path.home() / ".cache" / "capray")


@contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive file lock: concurrent actors on one machine build a cached thing once."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
