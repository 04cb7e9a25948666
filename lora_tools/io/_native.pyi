"""The compiled part (lora_tools/io/_native.c; optional, built by setup.py where a C compiler is found)."""

#: Whether the CPU runs the kernel vectorised (x86-64 with AVX2, or arm64); else torch is faster.
SIMD: int

def round_e4m3fn(values: object, codes: object, inv_scale: float, limit: float, /) -> tuple[float, float, int, float]:
    """``values`` (fp32) and ``codes`` (writable, uint8): anything with the buffer protocol (numpy arrays).
    ``values`` times ``inv_scale`` (a power of two), clamped to +-``limit``, rounded to e4m3fn into
    ``codes`` (one byte each); the summed squared errors and values (both times ``inv_scale``), how many were clamped, and
    the values' largest magnitude (NaN when one is NaN: then the codes are not torch's)."""

def largest_bits16(values: object, /) -> int:
    """The largest of the 16-bit values in ``values`` (bytes, little-endian) with the top bit cleared: the bits of
    the largest fp16/bf16 magnitude (at or above +inf's bits when one is NaN or infinite)."""
