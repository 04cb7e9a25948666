#!/usr/bin/env python
"""How fast can this machine durably copy the base, and what do the pieces of a streaming write cost?

Diagnostic (not a test). Each variant copies the same file to a new one and fsyncs it, with the
source warm in the page cache, in this process (wall and process CPU reported):

  cp+sync              ``cp SRC DST && sync DST`` (coreutils: copy_file_range inside the kernel)
  copy_file_range      os.copy_file_range per tensor, then fsync
  pread-fresh+write    per tensor: a fresh bytearray, os.preadv into it, write (what TensorFile +
                       StreamingWriter do), then fsync
  pread-reuse+write    the same into one reused buffer (no allocation, no page faults)
  +sha256              pread-reuse+write, also hashing every byte (what hash=True adds)
  sha256 only          hashing the (cached) file, no write
  pread->O_DIRECT      tensors read into a page-aligned staging buffer, written with O_DIRECT
                       (no page-cache copy), tail padded then truncated, fsync
  +sha256              the same, hashing the staging buffer
  pread+write+fadvise-dontneed  buffered writes, each written 64 MiB flushed with
                       sync_file_range and dropped with POSIX_FADV_DONTNEED as we go

Usage: python benchmarks/io_floor.py [FILE] [--repeat N]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from fuse_sdxl import cpu_busy_seconds, wait_for_quiet, warm  # noqa: E402

from lora_tools.io.safetensors import read_header  # noqa: E402


def cpu() -> float:
    a = resource.getrusage(resource.RUSAGE_SELF)
    b = resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def spans(src: Path) -> list[tuple[int, int]]:
    h = read_header(src)
    out = [(0, h.data_start)]
    for t in sorted(h.tensors.values(), key=lambda t: t.begin):
        out.append((h.data_start + t.begin, t.nbytes))
    return out


def v_cp(src: Path, dst: Path) -> None:
    subprocess.run(["sh", "-c", 'cp "$1" "$2" && sync "$2"', "sh", str(src), str(dst)], check=True)


def v_cfr(src: Path, dst: Path) -> None:
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        pos = 0
        for off, n in spans(src):
            done = 0
            while done < n:
                done += os.copy_file_range(fi.fileno(), fo.fileno(), n - done, off + done, pos + done)
            pos += n
        os.fsync(fo.fileno())


def _pread_write(src: Path, dst: Path, *, reuse: bool, sha: bool) -> None:
    sp = spans(src)
    big = bytearray(max(n for _, n in sp)) if reuse else None
    h = hashlib.sha256() if sha else None
    fd = os.open(src, os.O_RDONLY)
    try:
        with open(dst, "wb", buffering=0) as fo:
            for off, n in sp:
                buf = memoryview(big)[:n] if big is not None else memoryview(bytearray(n))
                got = 0
                while got < n:
                    got += os.preadv(fd, [buf[got:]], off + got)
                if h is not None:
                    h.update(buf)
                w = 0
                while w < n:
                    w += fo.write(buf[w:])
            os.fsync(fo.fileno())
    finally:
        os.close(fd)


def _odirect(src: Path, dst: Path, *, sha: bool) -> None:
    """Staging-buffer writer with O_DIRECT: tensors are read straight into a page-aligned
    buffer, full chunks go to disk bypassing the page cache, the tail is padded then truncated."""
    import mmap

    chunk = 16 << 20
    stage = mmap.mmap(-1, 2 * chunk)  # page aligned, anonymous
    view = memoryview(stage)
    h = hashlib.sha256() if sha else None
    fd = os.open(src, os.O_RDONLY)
    out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    fill = total = 0
    try:
        for off, n in spans(src):
            done = 0
            while done < n:
                take = min(n - done, 2 * chunk - fill)
                got = 0
                while got < take:
                    got += os.preadv(fd, [view[fill + got:fill + take]], off + done + got)
                if h is not None:
                    h.update(view[fill:fill + take])
                fill += take
                done += take
                if fill >= chunk:
                    os.write(out, view[:chunk])
                    total += chunk
                    view[:fill - chunk] = view[chunk:fill]
                    fill -= chunk
        if fill:
            padded = (fill + 4095) // 4096 * 4096
            view[fill:padded] = bytes(padded - fill)
            os.write(out, view[:padded])
            os.ftruncate(out, total + fill)
        os.fsync(out)
    finally:
        os.close(fd)
        os.close(out)
        view.release()
        stage.close()


def _sync_file_range(fd: int, offset: int, nbytes: int) -> None:
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    f = libc.sync_file_range
    f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    if f(fd, offset, nbytes, 1 | 2 | 4) != 0:  # WAIT_BEFORE | WRITE | WAIT_AFTER
        raise OSError(ctypes.get_errno(), "sync_file_range")


def _buffered_dontneed(src: Path, dst: Path) -> None:
    """Buffered writes, but written ranges are flushed and dropped from the page cache as we go."""
    sp = spans(src)
    big = bytearray(max(n for _, n in sp))
    fd = os.open(src, os.O_RDONLY)
    step = 64 << 20
    try:
        with open(dst, "wb", buffering=0) as fo:
            pos = flushed = 0
            for off, n in sp:
                buf = memoryview(big)[:n]
                got = 0
                while got < n:
                    got += os.preadv(fd, [buf[got:]], off + got)
                w = 0
                while w < n:
                    w += fo.write(buf[w:])
                pos += n
                if pos - flushed >= 2 * step:
                    _sync_file_range(fo.fileno(), flushed, step)
                    os.posix_fadvise(fo.fileno(), flushed, step, os.POSIX_FADV_DONTNEED)
                    flushed += step
            os.fsync(fo.fileno())
            os.posix_fadvise(fo.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def v_sha_only(src: Path, dst: Path) -> None:
    buf = bytearray(16 << 20)
    h = hashlib.sha256()
    with open(src, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(memoryview(buf)[:n])


VARIANTS = {
    "cp+sync": v_cp,
    "copy_file_range": v_cfr,
    "pread-fresh+write": lambda s, d: _pread_write(s, d, reuse=False, sha=False),
    "pread-reuse+write": lambda s, d: _pread_write(s, d, reuse=True, sha=False),
    "pread-reuse+write+sha256": lambda s, d: _pread_write(s, d, reuse=True, sha=True),
    "sha256 only": v_sha_only,
    "pread->O_DIRECT": lambda s, d: _odirect(s, d, sha=False),
    "pread->O_DIRECT+sha256": lambda s, d: _odirect(s, d, sha=True),
    "pread+write+fadvise-dontneed": _buffered_dontneed,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("file", nargs="?", type=Path, default=HERE / ".cache" / "full" / "sdxl-full-fp16.safetensors")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--only", nargs="+")
    args = ap.parse_args()
    out = args.file.parent / "out" / "io_floor.tmp"
    out.parent.mkdir(exist_ok=True)
    size = args.file.stat().st_size
    names = args.only or list(VARIANTS)
    for rep in range(args.repeat):
        for name in names:
            if out.exists():
                out.unlink()
            os.sync()
            warm([args.file])
            load = wait_for_quiet(120)
            c0, b0, t0 = cpu(), cpu_busy_seconds(), time.perf_counter()
            VARIANTS[name](args.file, out)
            wall = time.perf_counter() - t0
            c = cpu() - c0
            other = max(0.0, cpu_busy_seconds() - b0 - c) / wall
            print(f"[{rep + 1}] {name:<26} {wall:6.1f} s  {size / 1e9 / wall:5.2f} GB/s  cpu {c:5.1f} s  "
                  f"other busy cores {other:.2f} (load before {load:.2f})", flush=True)
    if out.exists():
        out.unlink()


if __name__ == "__main__":
    main()
