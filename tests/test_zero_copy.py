"""In-phase buffers and the O_DIRECT writer's zero-copy path; when the patcher may skip its scan.

The fuse reads each tensor into a page-aligned buffer at the tensor's offset in the output modulo
the page size, so the writer can send the tensor's whole pages to the disk from that buffer. The
files must come out byte for byte the same as through the staging copy.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch

from lora_tools.engine.buffers import PAGE, BufferRing
from lora_tools.io import direct as io_direct
from lora_tools.io.safetensors import StreamingWriter, TensorPlan


def _payloads() -> dict[str, bytes]:
    g = torch.Generator().manual_seed(1)
    sizes = {"small": 1001, "big.a": 700_001, "big.b": 1 << 20, "tiny": 3, "big.c": 3 * PAGE + 17, "big.d": 2_000_000}
    return {k: torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).numpy().tobytes() for k, n in sizes.items()}


def _write(path: Path, payloads: dict[str, bytes], *, in_phase: bool) -> StreamingWriter:
    ring = BufferRing()
    plans = [TensorPlan(k, "U8", (len(v),)) for k, v in payloads.items()]
    with StreamingWriter(path, plans, {"format": "pt"}, hash=True, direct=True) as w:
        for k, v in payloads.items():
            view = ring.take(len(v), w.position(k) if in_phase else 1)
            view[:] = v
            w.write(k, view)
            ring.give(view)
        w.finalize()
    return w


def test_in_phase_buffers_skip_the_copy_and_write_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(io_direct, "ZERO_COPY_MIN_BYTES", 4096)
    zero_copy: list[int] = []
    original = io_direct.DirectOut._write_pages
    monkeypatch.setattr(io_direct.DirectOut, "_write_pages", lambda self, pages: (zero_copy.append(pages.nbytes), original(self, pages)))
    payloads = _payloads()
    direct = _write(tmp_path / "direct.safetensors", payloads, in_phase=True)
    if not isinstance(direct._out, io_direct.DirectOut) and not zero_copy:
        pytest.skip("this filesystem refuses O_DIRECT")
    copied = _write(tmp_path / "copied.safetensors", payloads, in_phase=False)
    data = (tmp_path / "direct.safetensors").read_bytes()
    assert data == (tmp_path / "copied.safetensors").read_bytes()
    assert direct.sha256 == copied.sha256 == hashlib.sha256(data).hexdigest()
    assert len(zero_copy) == 4 and all(n % PAGE == 0 for n in zero_copy)  # the four tensors over a page went uncopied
    assert sum(zero_copy) > 0.9 * sum(len(v) for k, v in payloads.items() if k.startswith("big"))


def test_ring_places_views_in_phase_and_reuses_its_memory():
    ring = BufferRing(size=64 * PAGE)
    for phase in (0, 1, 2, 4095, 4096 + 7):
        view = ring.take(10_000, phase)
        assert view.nbytes == 10_000 and io_direct.address(view) % PAGE == phase % PAGE
        assert view.obj is ring._block
        ring.give(view)
    assert not ring._spans


def test_ring_wraps_around_never_overlaps_and_falls_back_when_full():
    ring = BufferRing(size=16 * PAGE)
    g = torch.Generator().manual_seed(3)
    live: list[tuple[memoryview, bytes]] = []
    fallbacks = 0
    for step in range(400):
        n = int(torch.randint(1, 5 * PAGE, (1,), generator=g))
        view = ring.take(n, int(torch.randint(0, PAGE, (1,), generator=g)))
        data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).numpy().tobytes()
        view[:] = data
        fallbacks += view.obj is not ring._block
        live.append((view, data))
        # give back in order, now and then one out of order, keeping a few in flight
        while len(live) > 3:
            i = 1 if step % 7 == 0 and len(live) > 1 else 0
            old, expected = live.pop(i)
            assert bytes(old) == expected  # nothing taken later wrote over it
            ring.give(old)
    assert 0 < fallbacks < 200  # mostly from the ring, and the rare overflow from a mapping of its own
    for view, expected in live:
        assert bytes(view) == expected
        ring.give(view)
    assert not ring._spans


@pytest.mark.parametrize("saves", [("checkpoint",), ("unet",), ("checkpoint", "unet", "diffusers")])
@pytest.mark.slow
def test_fuse_through_the_zero_copy_path_writes_the_same_files(assets, tmp_path, monkeypatch, saves):
    """Buffers are in phase with the first output only; the others take the staging copy."""
    from lora_tools.ops.fuse import fuse

    loras = [(str(assets.lightning_lora), 1.0), (str(assets.style), 0.6)]
    plain = fuse(assets.base, loras=loras, saves=saves, output=tmp_path / "plain" / "out.safetensors").files
    monkeypatch.setattr(io_direct, "DIRECT_MIN_BYTES", 0)
    monkeypatch.setattr(io_direct, "ZERO_COPY_MIN_BYTES", PAGE)
    zero_copy: list[int] = []
    original = io_direct.DirectOut._write_pages
    monkeypatch.setattr(io_direct.DirectOut, "_write_pages", lambda self, pages: (zero_copy.append(pages.nbytes), original(self, pages)))
    direct = fuse(assets.base, loras=loras, saves=saves, output=tmp_path / "direct" / "out.safetensors").files
    if not zero_copy:
        pytest.skip("this filesystem refuses O_DIRECT")
    assert [f.kind for f in plain] == [f.kind for f in direct] and len(direct) >= len(saves)
    created = re.compile(rb'created\\": \\"[0-9TZ:-]+')  # the record's time may differ by a second
    for p, d in zip(plain, direct, strict=True):
        a, b = p.path.read_bytes(), d.path.read_bytes()
        start = 8 + int.from_bytes(a[:8], "little")
        assert len(a) == len(b) and a[start:] == b[start:], d.path  # every tensor byte
        assert created.sub(b"", a[:start]) == created.sub(b"", b[:start])
        assert d.sha256 == hashlib.sha256(b).hexdigest()
    first = direct[0].path.read_bytes()
    assert created.search(first[:8 + int.from_bytes(first[:8], "little")])  # the pattern does match the record


def test_a_reader_waits_for_the_ring_instead_of_taking_memory_of_its_own() -> None:
    import threading

    ring = BufferRing(16 * PAGE)
    held = ring.take(12 * PAGE)
    assert held.obj is ring._block
    no_wait = ring.take(8 * PAGE)  # no room, no wait: a mapping of its own
    assert no_wait.obj is not ring._block
    threading.Timer(0.05, ring.give, args=(held,)).start()
    waited = ring.take(8 * PAGE, wait_s=5.0)  # room comes back when the writer gives the buffer back
    assert waited.obj is ring._block
    too_big = ring.take(12 * PAGE, wait_s=5.0)  # over half the ring: no wait
    assert too_big.obj is not ring._block
