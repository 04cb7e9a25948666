"""fp32 -> float8_e4m3fn rounding with its error (lora_tools/io/_fp8kernel.c; optional, built by setup.py)."""

#: Whether the CPU runs the kernel vectorised (x86-64 with AVX2, or arm64); else torch is faster.
SIMD: int

def round_e4m3fn(values: object, codes: object, inv_scale: float, limit: float, /) -> tuple[float, float, int, float]:
    """``values`` (fp32) and ``codes`` (writable, uint8): anything with the buffer protocol (numpy arrays).
    ``values`` times ``inv_scale`` (a power of two), clamped to +-``limit``, rounded to e4m3fn into
    ``codes`` (one byte each); the summed squared errors and values (both times ``inv_scale``), how many were clamped, and
    the values' largest magnitude (NaN when one is NaN: then the codes are not torch's)."""
