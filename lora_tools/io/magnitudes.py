"""The largest magnitude of a float tensor's raw bytes, and whether it holds NaN/Inf, without torch.

IEEE floats order their magnitudes like unsigned integers of the same bits with the sign bit cleared,
and NaN and infinity are exactly the patterns whose exponent bits are all set. So the integer
``max`` of the sign-cleared bits answers both questions exactly: what ``torch.aminmax`` gives,
without importing torch (a fuse plans while torch is still loading) and without widening to fp32.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from lora_tools.io.native import NATIVE as _native  # one pass over 16-bit values, where it is built (else numpy's two)

if TYPE_CHECKING:
    import numpy.typing as npt
    import torch


#: dtype -> (its width in bytes, the bits of +infinity: every magnitude at or above them is Inf or NaN).
_LAYOUT: dict[str, tuple[int, int]] = {
    "F16": (2, 0x7C00),
    "BF16": (2, 0x7F80),
    "F32": (4, 0x7F800000),
    "F64": (8, 0x7FF0000000000000),
}


def largest_magnitude(data: bytes | bytearray | memoryview | npt.NDArray[Any], dtype: str) -> float | None:
    """``max |x|`` over the little-endian values of ``dtype`` in ``data`` (``inf`` when any is NaN or
    infinite, ``0.0`` when empty), or ``None`` for a dtype this does not read (not a float of
    :data:`_LAYOUT`: the caller uses torch)."""
    import numpy as np

    layout = _LAYOUT.get(dtype)
    if layout is None:
        return None
    width, exponent = layout
    bits = np.frombuffer(data, dtype=np.dtype(f"<u{width}"))
    if bits.size == 0:
        return 0.0
    if width == 2 and _native is not None:
        top = _native.largest_bits16(bits)  # one pass
    else:
        # Read as signed integers, the positive values keep their order and the largest is the max; read as
        # unsigned, the negative ones are the sign bit plus their magnitude, above every positive one. Two
        # max passes over the bytes as they are: no sign-cleared copy.
        sign = 1 << (8 * width - 1)
        top = max(int(bits.view(f"<i{width}").max()), int(bits.max()) - sign)
    if top >= exponent:
        return math.inf
    if dtype == "F16":
        return float(np.array([top], dtype="<u2").view("<f2")[0])
    if dtype == "BF16":
        return float(np.array([top << 16], dtype="<u4").view("<f4")[0])
    return float(np.array([top], dtype=f"<u{width}").view(f"<f{width}")[0])


#: torch dtype (as ``str``: no torch at import) -> the safetensors name :func:`largest_magnitude` reads.
_TORCH_NAMES = {"torch.float16": "F16", "torch.bfloat16": "BF16", "torch.float32": "F32", "torch.float64": "F64"}


def tensor_largest_magnitude(t: torch.Tensor) -> float:
    """``max |x|`` of a float tensor (``inf`` when it holds NaN/Inf, ``0.0`` when empty): from its bits
    (:func:`largest_magnitude`) where it is contiguous in a dtype that reads, else torch's ``aminmax`` (fp8 widened
    to fp32 first)."""
    import torch

    if t.numel() == 0:
        return 0.0
    name = _TORCH_NAMES.get(str(t.dtype))
    if name is not None and t.is_contiguous():
        largest = largest_magnitude(t.view(-1).view(torch.uint8).numpy(), name)
        if largest is not None:
            return largest
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        t = t.float()
    lo, hi = (v.item() for v in torch.aminmax(t))
    return max(-lo, hi) if math.isfinite(lo) and math.isfinite(hi) else math.inf


__all__ = ["largest_magnitude", "tensor_largest_magnitude"]
