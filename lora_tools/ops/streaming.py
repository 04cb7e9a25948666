"""Moved to :mod:`lora_tools.engine.pipeline` (this name keeps old imports working)."""

from lora_tools.engine.pipeline import MAX_INFLIGHT_BYTES, run_pipeline

__all__ = ["MAX_INFLIGHT_BYTES", "run_pipeline"]
