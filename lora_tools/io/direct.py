"""Append-only output files: plain buffered writes, or O_DIRECT through an aligned staging buffer.

Writing a multi-GB model through the page cache costs the kernel as much CPU as the copy itself
(allocating, dirtying and writing back every page). With O_DIRECT the bytes go from one reused,
page-aligned staging buffer straight to the disk; a big tensor whose buffer is *in phase* with
the file (its address and its file offset agree modulo the page size, see
:mod:`lora_tools.engine.buffers`) goes to the disk from its own pages, with no copy at all.
Filesystems that refuse O_DIRECT get the buffered path; both end with fsync.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os

#: Outputs smaller than this are written buffered (direct I/O only pays off for big files).
DIRECT_MIN_BYTES = 64 << 20
_ALIGN = 4096
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_STAGE_BYTES = 16 << 20
#: In-phase views at least this big skip the staging copy.
ZERO_COPY_MIN_BYTES = 256 << 10


class BufferedOut:
    """Plain ``write`` calls on an fd."""

    def __init__(self, fd: int):
        self.fd = fd

    def write(self, view: memoryview) -> None:
        done = 0
        while done < view.nbytes:
            done += os.write(self.fd, view[done:])

    def finish(self, patch: tuple[int, bytes] | None = None) -> None:
        """Write what is pending, then ``patch`` (``(offset, bytes)``: bytes already written, overwritten),
        then fsync."""
        self._patch(patch)
        os.fsync(self.fd)

    def _patch(self, patch: tuple[int, bytes] | None) -> None:
        if patch is None:
            return
        offset, data = patch
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], offset + done)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class DirectOut(BufferedOut):
    """O_DIRECT writes of whole aligned chunks; the tail is padded, then the file truncated."""

    def __init__(self, fd: int):
        super().__init__(fd)
        self._stage = mmap.mmap(-1, _STAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # page aligned
        self._view = memoryview(self._stage)
        self._fill = 0
        self._size = 0

    def write(self, view: memoryview) -> None:
        pos = self._size + self._fill
        head = -pos % _ALIGN  # bytes that complete the current page
        whole = (view.nbytes - head) // _ALIGN * _ALIGN if view.nbytes > head else 0
        if whole and view.nbytes >= ZERO_COPY_MIN_BYTES and not view.readonly and address(view) % _ALIGN == pos % _ALIGN:
            self._copy(view[:head])
            self._write_pages(view[head:head + whole])
            self._copy(view[head + whole:])
        else:
            self._copy(view)

    def _copy(self, view: memoryview) -> None:
        pos = 0
        while pos < view.nbytes:
            take = min(view.nbytes - pos, _STAGE_BYTES - self._fill)
            self._view[self._fill:self._fill + take] = view[pos:pos + take]
            self._fill += take
            pos += take
            if self._fill == _STAGE_BYTES:
                self._flush(_STAGE_BYTES)

    def _write_pages(self, pages: memoryview) -> None:
        """The staged pages, then ``pages`` (in phase, whole pages) straight from the caller's memory."""
        parts = [self._view[:self._fill], pages] if self._fill else [pages]
        total = sum(p.nbytes for p in parts)
        done = os.writev(self.fd, parts)
        while done < total:  # a short write: finish piece by piece
            skip = done
            rest = []
            for p in parts:
                if skip >= p.nbytes:
                    skip -= p.nbytes
                else:
                    rest.append(p[skip:])
                    skip = 0
            parts = rest
            total -= done
            done = os.writev(self.fd, parts)
        self._size += self._fill + pages.nbytes
        self._fill = 0

    def _flush(self, n: int) -> None:
        done = 0
        while done < n:
            done += os.write(self.fd, self._view[done:n])
        self._size += self._fill
        self._fill = 0

    def finish(self, patch: tuple[int, bytes] | None = None) -> None:
        if self._fill:
            size = self._size + self._fill
            padded = -(-self._fill // _ALIGN) * _ALIGN
            self._view[self._fill:padded] = bytes(padded - self._fill)
            self._flush(padded)
            os.ftruncate(self.fd, size)
            self._size = size
        if patch is not None:  # a few unaligned bytes: through the page cache (fsync writes them below)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~_O_DIRECT)
            self._patch(patch)
        os.fsync(self.fd)

    def close(self) -> None:
        super().close()
        if not self._stage.closed:
            self._view.release()
            self._stage.close()


def address(view: memoryview) -> int:
    """Memory address of a writable view's first byte."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def open_out(path: str | os.PathLike[str], expected_bytes: int, *, direct: bool | None = None) -> BufferedOut:
    """Open an existing empty file for appending; O_DIRECT for big outputs where supported."""
    want_direct = direct if direct is not None else expected_bytes >= DIRECT_MIN_BYTES
    if want_direct and _O_DIRECT:
        try:
            return DirectOut(os.open(path, os.O_WRONLY | _O_DIRECT))
        except OSError:
            pass  # tmpfs and some network filesystems refuse O_DIRECT
    return BufferedOut(os.open(path, os.O_WRONLY))
