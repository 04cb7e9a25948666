"""lora_tools: turn SDXL checkpoints into few-step Lightning models; inspect, convert and fuse LoRAs.

The public API is imported lazily, so ``import lora_tools`` (and ``loratool inspect``) does not
import torch.

The verbs are the operations the commands and recipe jobs run, with the same options models
(:mod:`lora_tools.ops.registry`): ``rescale``, ``resize``, ``merge``, ``convert``, ``extract``,
``analyze``, ``verify`` and ``publish`` take an options model, a mapping or keywords and return an
:class:`~lora_tools.ops.operation.OpResult` (files written, report, adapter). ``fuse`` keeps its
keyword signature (:func:`lora_tools.ops.fuse.fuse`); ``operations["fuse"]`` takes ``FuseOptions``.

Example:
    >>> import lora_tools
    >>> report = lora_tools.inspect_path("sdxl_lightning_4step_lora.safetensors")
    >>> result = lora_tools.fuse("juggernaut.safetensors", "lightning-4step")
    >>> half = lora_tools.rescale(lora="style.safetensors", strength=0.5, output="half.safetensors")
    >>> lora_tools.run_recipe("recipes/lightning-4step.yaml", sets=["base=juggernaut.safetensors"])
"""

from __future__ import annotations

from typing import Any

from lora_tools._version import __version__

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
    "run_recipe": "lora_tools.recipes.run",
    "plan_recipe": "lora_tools.recipes.run",
    "OpResult": "lora_tools.ops.operation",
    "FuseOptions": "lora_tools.ops.verbs.fuse",
    "RescaleOptions": "lora_tools.ops.verbs.rescale",
    "ResizeOptions": "lora_tools.ops.verbs.resize",
    "MergeOptions": "lora_tools.ops.verbs.merge",
    "ConvertOptions": "lora_tools.ops.verbs.convert",
    "ExtractOptions": "lora_tools.ops.verbs.extract",
    "AnalyzeOptions": "lora_tools.ops.verbs.analyze",
    "VerifyOptions": "lora_tools.ops.verbs.verify",
    "PublishOptions": "lora_tools.ops.verbs.publish",
}
#: The verbs exported as their operation (``lora_tools.rescale(...)`` is what ``loratool rescale`` runs).
_VERBS = ("rescale", "resize", "merge", "convert", "extract", "analyze", "verify", "publish")

__all__ = ["__version__", *_EXPORTS, *_VERBS, "operations"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _VERBS or name == "operations":
        from lora_tools.ops.registry import OPS

        return OPS if name == "operations" else OPS[name]
    raise AttributeError(f"module 'lora_tools' has no attribute {name!r}")
