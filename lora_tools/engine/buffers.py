"""Read buffers for streaming: one page-aligned ring, reused lap after lap.

Tensors are read, patched and written in order, so their buffers are taken and given back in
(nearly) the same order: a ring allocator fits. After the first lap no page is faulted in or
zeroed again, and resident memory stays at the ring's size whatever the model.

A tensor is placed at a *phase*: its byte offset in the output file modulo the page size. Its
bytes then sit exactly as the O_DIRECT writer wants them, and it sends the tensor's whole pages to
the disk from this buffer, without a staging copy (:class:`lora_tools.io.direct.DirectOut`).
"""

from __future__ import annotations

import mmap
import threading
import time
from collections import deque

from lora_tools.io.direct import address

#: Size of the ring: the pipeline's read-ahead and write-behind budgets, with room to spare.
RING_BYTES = 320 << 20
PAGE = mmap.PAGESIZE
HUGE_PAGE = 2 << 20


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """A page-aligned private anonymous mapping (not shared memory: no shmem page-cache work),
    backed by huge pages where the kernel allows it (512 times fewer page faults to fill it)."""
    block = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if nbytes >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            block.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return block


class BufferRing:
    """Thread-safe ring of byte buffers. When the ring has no room (a tensor larger than the free
    span, or more in flight than the ring holds) :meth:`take` waits up to ``wait_s`` for buffers to
    come back, then gives a mapping of its own, released when dropped (memory beyond the ring: a
    slow writer, hashing, had the reader take 26-59 MB more this way)."""

    def __init__(self, size: int = RING_BYTES):
        self.size = size
        self._block = aligned_buffer(size)
        self._base = address(memoryview(self._block)[:1])
        self._spans: deque[list[int]] = deque()  # [start, end, given back], in the order taken
        self._head = 0
        self._lock = threading.Condition()

    def take(self, nbytes: int, phase: int = 0, wait_s: float = 0.0) -> memoryview:
        """A writable view of ``nbytes`` that starts ``phase`` bytes (mod page size) past a page boundary.
        Only a caller whose wait cannot hold up the buffers it waits for (the reader: every buffer
        ahead of it goes to the writer without it) should wait."""
        if nbytes == 0:
            return memoryview(bytearray())
        deadline = time.monotonic() + wait_s if nbytes <= self.size // 2 else 0.0
        with self._lock:
            while True:
                start = self._fit(nbytes, phase % PAGE)
                if start is not None:
                    self._spans.append([start, start + nbytes, 0])
                    self._head = start + nbytes
                    return memoryview(self._block)[start:start + nbytes]
                left = deadline - time.monotonic()
                if left <= 0 or not self._spans:
                    break
                self._lock.wait(left)
        own = aligned_buffer(-(-(nbytes + PAGE) // PAGE) * PAGE)
        return memoryview(own)[phase % PAGE:phase % PAGE + nbytes]

    def give(self, view: memoryview | bytearray) -> None:
        """Hand a view back once nothing reads it any more (views not from the ring are ignored)."""
        if not isinstance(view, memoryview) or view.obj is not self._block:
            return
        start = address(view) - self._base
        with self._lock:
            for span in self._spans:
                if span[0] == start and not span[2]:
                    span[2] = 1
                    break
            while self._spans and self._spans[0][2]:
                self._spans.popleft()
            self._lock.notify_all()

    def _fit(self, nbytes: int, phase: int) -> int | None:
        def placed(at: int) -> int:
            return at + (phase - at) % PAGE

        if not self._spans:
            start = placed(0)
            return start if start + nbytes <= self.size else None
        tail = self._spans[0][0]
        if self._head > tail:  # in use: [tail, head); free: [head, size) then [0, tail)
            start = placed(self._head)
            if start + nbytes <= self.size:
                return start
            start = placed(0)
            return start if start + nbytes < tail else None
        start = placed(self._head)  # wrapped: free is [head, tail)
        return start if start + nbytes < tail else None
