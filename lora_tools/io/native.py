"""The optional compiled part of lora_tools, ``lora_tools/io/_native.c``.

``NATIVE`` is its module where it is built (``setup.py`` builds it where a C compiler is found) and this CPU
runs it vectorised (x86-64 with AVX2, arm64); else ``None``, and its callers (:mod:`lora_tools.io.fp8`,
:mod:`lora_tools.io.magnitudes`) use torch or numpy, to the same bits.
"""

from __future__ import annotations

try:
    from lora_tools.io import _native as NATIVE
except ImportError:  # pragma: no cover - installed without a C compiler
    NATIVE = None  # type: ignore[assignment]
if NATIVE is not None and not NATIVE.SIMD:  # the vectors would be emulated: slower than torch's own passes
    NATIVE = None  # type: ignore[assignment]

__all__ = ["NATIVE"]
