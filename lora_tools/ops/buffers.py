"""Reusable, page-aligned byte buffers for streaming: no zero-filling, no fresh page faults per tensor.

SDXL repeats a few hundred tensor sizes thousands of times; handing a finished tensor's buffer
to the next tensor of the same size saves the kernel from mapping and zeroing new pages for
every read, and keeps resident memory flat.

A tensor is placed in its buffer at a *phase*: its byte offset in the output file modulo the page
size. The bytes then sit exactly as the page-aligned O_DIRECT writer wants them, and it sends the
tensor's whole pages to the disk from this buffer, without a staging copy
(:class:`lora_tools.file_out.DirectOut`).
"""

from __future__ import annotations

import bisect
import mmap
import threading

#: Bytes of free buffers a pool keeps for reuse.
POOL_BYTES = 256 << 20
PAGE = mmap.PAGESIZE
HUGE_PAGE = 2 << 20


def capacity_for(nbytes: int) -> int:
    """Buffer size that holds ``nbytes`` at any phase: one spare page, rounded up to a size class
    (eighths of a power of two, so that tensors of similar sizes share buffers; at most 1/8 lost)."""
    need = -(-nbytes // PAGE) * PAGE + PAGE
    step = max(PAGE, (1 << (need - 1).bit_length()) // 8)
    return -(-need // step) * step


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


class BufferPool:
    """A thread-safe free list of page-aligned buffers (anonymous mappings), holding at most
    ``limit`` bytes. A request takes the smallest free buffer that fits (up to twice its size),
    so buffers move between tensors of different sizes instead of being unmapped and mapped again."""

    def __init__(self, limit: int = POOL_BYTES):
        self.limit = limit
        self._free: list[mmap.mmap] = []  # by size
        self._held = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int, phase: int = 0) -> memoryview:
        """A writable view of ``nbytes`` that starts ``phase`` bytes (mod page size) past a page boundary."""
        cap = capacity_for(nbytes)
        block = None
        with self._lock:
            i = bisect.bisect_left(self._free, cap, key=len)
            if i < len(self._free) and len(self._free[i]) <= 2 * cap:
                block = self._free.pop(i)
                self._held -= len(block)
        if block is None:
            block = aligned_buffer(cap)
        start = phase % PAGE
        return memoryview(block)[start:start + nbytes]

    def give(self, view: memoryview) -> None:
        """Return a view's buffer (anything not from :meth:`take` is ignored)."""
        block = view.obj
        if not isinstance(block, mmap.mmap):
            return
        with self._lock:
            bisect.insort(self._free, block, key=len)
            self._held += len(block)
            while self._held > self.limit:  # drop the smallest: the big ones cost most to map again
                self._held -= len(self._free.pop(0))
