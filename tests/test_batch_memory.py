"""The driver gives freed memory back between slices (capray/batch/memory.py)."""

from __future__ import annotations

import psutil
import pytest

from capray.batch import memory


@pytest.mark.skipif(memory._malloc_trim() is None, reason="this C library has no malloc_trim")
def test_freed_heap_memory_goes_back_to_the_os():
    process = psutil.Process()
    chunks = [bytearray(4096) for _ in range(40_000)]  # ~160 MB from malloc, not from Python's arenas
    keep = chunks[-1]  # a live chunk at the top of the heap: free alone cannot shrink it
    del chunks
    before = process.memory_info().rss
    assert memory.release_freed_memory()
    after = process.memory_info().rss
    assert before - after > 100 * 2**20, (before, after)
    assert len(keep) == 4096
