"""The process's memory allocator, tuned for a model's large temporaries.

glibc serves allocations above its mmap threshold (32 MiB at most, adaptively) with fresh mmap'd
pages and gives them back on free, so every large temporary of a step (a prefill's activations,
a batch's logits) pays a page fault per 4 KiB page on first touch. Raising the mmap and trim
thresholds keeps freed memory in the heap for the next step instead, which shortens a large prefill
somewhat, and did so by about a third before the expert computation was blocked (moe.row_blocks;
docs/measurements.md). (vLLM's CPU backend preloads tcmalloc for the same reason.)
The cost: the process keeps its peak memory instead of returning it to the system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_BYTES = 1 << 30  # allocations below this come from the heap (mallopt returns 0 where refused)


def keep_freed_memory() -> bool:
    """Set this process's glibc thresholds (once per process is enough); False where not glibc."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2 * _KEEP_BYTES))
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    log.debug("allocator thresholds raised: %s", ok)
    return ok
