"""Moved to :mod:`lora_tools.engine.buffers` (this name keeps old imports working)."""

from lora_tools.engine.buffers import HUGE_PAGE, PAGE, RING_BYTES, BufferRing, aligned_buffer

__all__ = ["HUGE_PAGE", "PAGE", "RING_BYTES", "BufferRing", "aligned_buffer"]
