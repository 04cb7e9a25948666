"""The old home of the LoRA types; they live in :mod:`lora_tools.lora.adapter`."""

from __future__ import annotations

from lora_tools.lora.adapter import AdapterKind, AdapterModule, LoraAdapter, LoraModule

__all__ = ["AdapterKind", "AdapterModule", "LoraAdapter", "LoraModule"]
