"""The fp8 rounding kernel (lora_tools/io/_native.c) against torch's own fp32 -> float8_e4m3fn cast.

The oracle is torch: ``(x * inv_scale).clamp(-limit, limit).to(torch.float8_e4m3fn)`` gives the codes, and the
errors and sums are computed here in fp64 from torch's codes. Every fp32 exponent is swept, every tie between two
neighbouring e4m3fn values is hit exactly, and the blocks are of every length around the kernel's vector width.
"""

from __future__ import annotations

import math
import shutil
import sysconfig

import pytest
import torch

from lora_tools.io import fp8

try:
    from lora_tools.io import _native as kernel
except ImportError:  # built without a compiler: the kernel's own tests skip, the last test below says why
    kernel = None  # type: ignore[assignment]
needs_kernel = pytest.mark.skipif(kernel is None, reason="the C kernel is not built (no C compiler)")


def _oracle(x: torch.Tensor, inv: float, limit: float = 448.0) -> tuple[torch.Tensor, float, float, int, float]:
    scaled = x.double() * inv
    codes = scaled.float().clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    err = float(((scaled.abs() - codes.double().abs()) ** 2).sum())
    return codes.view(torch.uint8), err, float((scaled ** 2).sum()), int((scaled.abs() > limit).sum()), \
        float(x.abs().max()) if x.numel() else 0.0


def _run(x: torch.Tensor, inv: float, limit: float = 448.0) -> tuple[torch.Tensor, float, float, int, float]:
    codes = torch.empty(x.numel(), dtype=torch.uint8)
    err, ref, saturated, amax = kernel.round_e4m3fn(x.numpy(), codes.numpy(), inv, limit)
    return codes, err, ref, saturated, amax


def _assert_same(x: torch.Tensor, inv: float = 1.0, limit: float = 448.0) -> None:
    codes, err, ref, saturated, amax = _run(x, inv, limit)
    want_codes, want_err, want_ref, want_saturated, want_amax = _oracle(x, inv, limit)
    bad = (codes != want_codes).nonzero()
    assert not bad.numel(), f"{bad.numel()} codes differ, first at {x[bad[0, 0]].item()!r}: " \
                            f"{codes[bad[0, 0]].item():#04x} vs torch's {want_codes[bad[0, 0]].item():#04x}"
    assert err == pytest.approx(want_err, rel=1e-5, abs=1e-30)
    assert ref == pytest.approx(want_ref, rel=1e-5, abs=1e-30)
    assert (saturated, amax) == (want_saturated, want_amax)


def _fp32_sweep(step: int) -> torch.Tensor:
    """Every ``step``-th fp32 bit pattern, both signs, NaN and Inf left out."""
    bits = torch.arange(0, 2 ** 31, step, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    x = x[torch.isfinite(x)]
    return torch.cat([x, -x])


@needs_kernel
@pytest.mark.parametrize("inv", [1.0, 2.0 ** -3, 2.0 ** 7])
@pytest.mark.parametrize("limit", [448.0, math.inf], ids=["clamped", "unclamped"])
def test_every_fp32_exponent_rounds_as_torch_casts(inv: float, limit: float) -> None:
    """Clamped: beyond +-448 too (counted, the clamp in the error; fp32 sums: up to 1e15). Unclamped (the
    kernel's other loop, for tensors known to fit): up to 448."""
    x = _fp32_sweep(9973)
    _assert_same(x[(x.abs() * inv) < (1e15 if limit == 448.0 else 448.0)], inv, limit)


@needs_kernel
def test_every_tie_between_neighbouring_codes_goes_to_the_even_one() -> None:
    values = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448, no NaN
    mids = (values[:-1] + values[1:]) / 2  # exact in fp32
    up, down = torch.nextafter(mids, torch.tensor(math.inf)), torch.nextafter(mids, torch.tensor(0.0))
    x = torch.cat([mids, up, down, values, torch.tensor([2.0 ** -10, 2.0 ** -10 * 3, -0.0])])
    _assert_same(torch.cat([x, -x]), limit=math.inf)
    x = torch.cat([x, torch.tensor([448.0, 463.99, 464.0, 480.0, 1e6])])
    _assert_same(torch.cat([x, -x]))


@needs_kernel
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 15, 16, 17, 8 * 8192 - 1, 8 * 8192 + 3])
def test_blocks_of_any_length(n: int) -> None:
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.05
    _assert_same(x, 2.0 ** 12)


@needs_kernel
def test_the_largest_magnitude_shows_nan_and_inf() -> None:
    for bad in (math.nan, math.inf, -math.inf):
        x = torch.randn(100)
        x[37] = bad
        amax = _run(x, 1.0)[4]
        assert math.isnan(amax) if math.isnan(bad) else amax == math.inf


@pytest.mark.parametrize("native", [True, False], ids=["kernel", "torch"])
@pytest.mark.parametrize("form", ["scaled", "plain"])
def test_the_rounder_gives_the_same_bits_and_error_with_the_kernel_or_torch(
        native: bool, form: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both paths of :class:`fp8.BlockRounder`; a block holding NaN gets torch's codes from the kernel's path too."""
    if not native:
        monkeypatch.setattr(fp8, "_native", None)
    elif fp8._native is None:
        pytest.skip("no kernel, or one this CPU runs slower than torch (no AVX2)")
    w = torch.randn(300, 77, generator=torch.Generator().manual_seed(3)) * (0.02 if form == "scaled" else 200.0)
    w[5, 5] = 0.0
    q, scale, rounding = fp8.quantize_measured(w, form)  # type: ignore[arg-type]
    s = scale or 1.0
    want = (w / s).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(q.view(torch.uint8), want.view(torch.uint8))
    assert rounding.err_sq == pytest.approx(float(((want.double() * s - w.double()) ** 2).sum()), rel=1e-5)
    assert rounding.saturated == int((w.abs() > 448).sum()) * (form == "plain")
    block = w[:10].clone().reshape(-1)
    block[3] = math.nan
    codes = torch.empty(block.numel(), dtype=torch.uint8)
    rounder = fp8.BlockRounder(form, codes, 1.0)  # type: ignore[arg-type]
    expected = (block / (rounder.scale or 1.0)).to(torch.float8_e4m3fn).view(torch.uint8)
    assert math.isnan(rounder(block, 0))
    assert torch.equal(codes[~expected.eq(0x7F)], expected[~expected.eq(0x7F)])
    assert codes[3] in (0x7F, 0xFF)


def test_the_kernel_is_built_where_a_compiler_is() -> None:
    """``pip install`` builds the kernel with the interpreter's C compiler; where there is one, it is here and used."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc})")
    assert kernel is not None, "lora_tools/io/_native.c is not built: pip install -e . builds it"
    assert fp8._native is kernel or not kernel.SIMD


@needs_kernel
@pytest.mark.parametrize("n", [1, 15, 16, 17, 1000, 65536])
def test_largest_bits16_is_the_largest_sign_cleared_pattern(n: int) -> None:
    """Every 16-bit pattern, in blocks of every length around the vector width, with the largest anywhere."""
    every = torch.randperm(65536, generator=torch.Generator().manual_seed(n)).to(torch.int32)
    for block in every.split(n):
        bits = block.to(torch.int16)  # wraps: the patterns with the top bit set are negative here
        want = int((block & 0x7FFF).max())
        assert kernel.largest_bits16(bits.numpy()) == want
    with pytest.raises(ValueError, match="even length"):
        kernel.largest_bits16(b"abc")
