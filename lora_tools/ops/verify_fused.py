"""Moved to :mod:`lora_tools.verify.weights` (the weight oracle); kept so that old imports keep working."""

from lora_tools.verify.weights import FuseCheck, compare_with_runtime_lora

__all__ = ["FuseCheck", "compare_with_runtime_lora"]
