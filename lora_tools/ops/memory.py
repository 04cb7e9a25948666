"""Keep the resident memory of a streaming job at what it holds, not at what it once held.

glibc raises its mmap threshold after large frees (up to 32 MiB), after which big tensor
buffers come from the heap and freed pages are not returned to the system: resident memory
then grows towards the sum of the largest buffers ever live at once. Fixing the threshold keeps
every large buffer in its own mapping, given back on free.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Serve allocations over ``threshold`` bytes with their own mappings (glibc only; no-op elsewhere)."""
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold))
    _done = ok
    logger.debug("mallopt mmap/trim threshold %d: %s", threshold, ok)
    return ok
