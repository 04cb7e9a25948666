"""lora_tools: turn SDXL checkpoints into few-step Lightning models; inspect, convert and fuse LoRAs.

The public API is imported lazily, so ``import lora_tools`` (and ``loratool inspect``) does not
import torch.

Example:
    >>> import lora_tools
    >>> report = lora_tools.inspect_path("sdxl_lightning_4step_lora.safetensors")
    >>> result = lora_tools.fuse("juggernaut.safetensors", "lightning-4step")
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "fuse": "lora_tools.ops.fuse",
    "run_fuse": "lora_tools.ops.fuse",
    "plan_fuse": "lora_tools.ops.fuse_plan",
    "inspect_path": "lora_tools.ops.inspect",
    "load_lora": "lora_tools.lora.load",
    "detect_format": "lora_tools.lora.load",
    "save_lora": "lora_tools.lora.save",
    "LoraAdapter": "lora_tools.lora.adapter",
    "LoraModule": "lora_tools.lora.adapter",
    "open_model": "lora_tools.io.model",
    "compare_with_runtime_lora": "lora_tools.verify.weights",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lora_tools' has no attribute {name!r}")
