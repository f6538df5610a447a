"""Give the driver's freed memory back to the OS between slices.

Ray Data keeps ~10 KB of native state on the driver per block for the life of an execution and frees
most of it when the execution ends, but glibc keeps freed pages in its arenas, so the driver's RSS
only ever grows: ~2 MB per slice, measured (`benchmarks/scale.py`). `malloc_trim` returns them, which
leaves ~0.85 MB per slice (Ray's per-execution actor and function registrations). A no-op where the
C library has no `malloc_trim` (macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Collect garbage, then return the C heap's free pages to the OS; True if anything was returned."""
    gc.collect()
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
