"""Append-only output files: plain buffered writes, or O_DIRECT through an aligned staging buffer.

Writing a multi-GB model through the page cache costs the kernel as much CPU as the copy itself
(allocating, dirtying and writing back every page). With O_DIRECT the bytes go from one reused,
page-aligned staging buffer straight to the disk. Filesystems that refuse O_DIRECT get the
buffered path; both end with fsync.
"""

from __future__ import annotations

import mmap
import os

#: Outputs smaller than this are written buffered (direct I/O only pays off for big files).
DIRECT_MIN_BYTES = 64 << 20
_ALIGN = 4096
_STAGE_BYTES = 16 << 20


class BufferedOut:
    """Plain ``write`` calls on an fd."""

    def __init__(self, fd: int):
        self.fd = fd

    def write(self, view: memoryview) -> None:
        done = 0
        while done < view.nbytes:
            done += os.write(self.fd, view[done:])

    def finish(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class DirectOut(BufferedOut):
    """O_DIRECT writes of whole aligned chunks; the tail is padded, then the file truncated."""

    def __init__(self, fd: int):
        super().__init__(fd)
        self._stage = mmap.mmap(-1, _STAGE_BYTES)  # anonymous mappings are page aligned
        self._view = memoryview(self._stage)
        self._fill = 0
        self._size = 0

    def write(self, view: memoryview) -> None:
        pos = 0
        while pos < view.nbytes:
            take = min(view.nbytes - pos, _STAGE_BYTES - self._fill)
            self._view[self._fill:self._fill + take] = view[pos:pos + take]
            self._fill += take
            pos += take
            if self._fill == _STAGE_BYTES:
                self._flush(_STAGE_BYTES)

    def _flush(self, n: int) -> None:
        done = 0
        while done < n:
            done += os.write(self.fd, self._view[done:n])
        self._size += self._fill
        self._fill = 0

    def finish(self) -> None:
        if self._fill:
            size = self._size + self._fill
            padded = -(-self._fill // _ALIGN) * _ALIGN
            self._view[self._fill:padded] = bytes(padded - self._fill)
            self._flush(padded)
            os.ftruncate(self.fd, size)
            self._size = size
        os.fsync(self.fd)

    def close(self) -> None:
        super().close()
        if not self._stage.closed:
            self._view.release()
            self._stage.close()


def open_out(path: str | os.PathLike[str], expected_bytes: int, *, direct: bool | None = None) -> BufferedOut:
    """Open an existing empty file for appending; O_DIRECT for big outputs where supported."""
    want_direct = direct if direct is not None else expected_bytes >= DIRECT_MIN_BYTES
    flag = getattr(os, "O_DIRECT", 0)
    if want_direct and flag:
        try:
            return DirectOut(os.open(path, os.O_WRONLY | flag))
        except OSError:
            pass  # tmpfs and some network filesystems refuse O_DIRECT
    return BufferedOut(os.open(path, os.O_WRONLY))
