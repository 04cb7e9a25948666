"""Reusable byte buffers for streaming: no zero-filling, no fresh page faults per tensor.

SDXL repeats a few hundred tensor sizes thousands of times; handing a finished tensor's buffer
to the next tensor of the same size saves the kernel from mapping and zeroing new pages for
every read, and keeps resident memory flat.
"""

from __future__ import annotations

import threading
from collections import defaultdict


#: Bytes of free buffers a pool keeps for reuse.
POOL_BYTES = 256 << 20


class BufferPool:
    """A thread-safe free list of ``bytearray`` buffers by exact size, holding at most ``limit`` bytes."""

    def __init__(self, limit: int = POOL_BYTES):
        self.limit = limit
        self._free: dict[int, list[bytearray]] = defaultdict(list)
        self._held = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> bytearray:
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                self._held -= nbytes
                return free.pop()
        return bytearray(nbytes)

    def give(self, buf: bytearray) -> None:
        n = len(buf)
        with self._lock:
            if self._held + n <= self.limit:
                self._free[n].append(buf)
                self._held += n
