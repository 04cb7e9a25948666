"""The fp8 rounding's arithmetic (lora_tools/io/fp8.py ``_round_chunk``) against torch's fp32 -> float8_e4m3fn
cast, bit for bit: the codes, and the rounded magnitude it hands to the error (torch's fp8 -> fp32 widening)."""

from __future__ import annotations

import pytest
import torch

from lora_tools.io import fp8

TOP = 0x43E00000  # the bits of 448.0, e4m3fn's largest finite value
SIGN = -(2 ** 31)


def _check(bits: torch.Tensor) -> None:
    """Every fp32 whose bits are in ``bits`` (finite, |x| <= 448), and its negation."""
    bits = torch.cat([bits, bits | SIGN]).to(torch.int32)
    x = bits.view(torch.float32).clone()
    want = x.to(torch.float8_e4m3fn)
    n = x.numel()
    codes = torch.empty(n, dtype=torch.uint8)
    r = fp8._round_chunk(x, codes, torch.empty(n), torch.empty(n, dtype=torch.int32), torch.empty(n, dtype=torch.int32))
    bad = (codes != want.view(torch.uint8)).nonzero().flatten()[:5]
    assert bad.numel() == 0, [(hex(int(bits[i])), int(codes[i]), int(want.view(torch.uint8)[i])) for i in bad]
    assert torch.equal(r.view(torch.int32), want.float().abs().view(torch.int32))
    assert torch.equal(x, bits.view(torch.float32).abs())


def test_codes_at_every_boundary_tie_and_exponent_and_random_values() -> None:
    grid = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # every finite code >= 0
    ties = (grid[:-1] + grid[1:]) / 2  # exactly halfway (fp32 holds it): ties to even
    points = torch.cat([grid, ties]).view(torch.int32)
    near = (points[:, None] + torch.arange(-200, 201, dtype=torch.int32)).flatten()  # 300 ulps either side
    exponents = torch.arange(0, TOP >> 23, dtype=torch.int32) << 23  # every fp32 binade below 448 ...
    edges = (exponents[:, None] + torch.arange(-64, 65, dtype=torch.int32)).flatten()  # ... entered and left
    subnormals = torch.arange(0, 1 << 16, dtype=torch.int32)  # fp32 subnormals and zero
    rand = torch.randint(0, TOP + 1, (1_000_000,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    bits = torch.cat([near, edges, subnormals, rand.to(torch.int32)])
    _check(bits[(bits >= 0) & (bits <= TOP)])


@pytest.mark.slow
def test_codes_of_every_fp32_up_to_448() -> None:
    """All 2 * 1.14e9 fp32 values with |x| <= 448 (about two minutes)."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    step = 1 << 24
    for start in range(0, TOP + 1, step):
        _check(torch.arange(start, min(TOP + 1, start + step), dtype=torch.int32))


def test_quantize_measured_with_nan_keeps_torchs_nan_codes() -> None:
    w = torch.tensor([1.0, float("nan"), -0.0, -3.0, 500.0, -float("nan")])
    q, _, rounding = fp8.quantize_measured(w, "plain")
    want = w.clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(q.view(torch.uint8), want.view(torch.uint8))
    assert rounding.err_sq != rounding.err_sq  # NaN: the error of a NaN is not a number


def test_chunks_and_signs_in_quantize_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fp8, "CHUNK_ELEMS", 1000)
    w = torch.randn(10_001, generator=torch.Generator().manual_seed(2)) * 0.05
    w[3], w[4] = -0.0, -1e-30  # both round to fp8 negative zero
    q, scale, rounding = fp8.quantize_measured(w, "scaled")
    assert scale is not None
    want = (w / scale).to(torch.float8_e4m3fn)
    assert torch.equal(q.view(torch.uint8), want.view(torch.uint8)) and int(q.view(torch.uint8)[4]) == 0x80
    err = float(((want.double() * scale - w.double()) ** 2).sum())
    assert rounding.err_sq == pytest.approx(err, rel=1e-5)
