"""convert: the same LoRA in another format (lossless; the factors are not touched)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora_tools.errors import UsageError
from lora_tools.lora.validate import validate_lora
from lora_tools.provenance import build_record, derived_metadata, source_entry, with_record

if TYPE_CHECKING:
    from lora_tools.lora.adapter import LoraAdapter

#: The formats ``convert`` writes (``diffusers-legacy`` is read-only).
TARGET_FORMATS = ("kohya", "kohya-diffusers", "diffusers", "peft", "comfy")


def convert_lora(adapter: LoraAdapter, to: str) -> tuple[LoraAdapter, str]:
    """The LoRA to write in format `to`: the same modules and factors, a ``loratool`` record added.

    The key spelling is done by :func:`lora_tools.lora.save.save_lora` when it writes in format `to`.

    Args:
        adapter: the input LoRA.
        to: one of :data:`TARGET_FORMATS`.

    Returns:
        ``(adapter, format)`` to pass to ``save_lora``.

    Raises:
        UsageError: an unknown target format.
        ShapeMismatchError, NonFiniteError: an input LoRA whose factors do not fit each other or hold
            NaN/Inf (:func:`lora_tools.lora.validate.validate_lora`).
    """
    if to not in TARGET_FORMATS:
        raise UsageError(f"unknown target format {to!r}; expected one of {', '.join(TARGET_FORMATS)}")

    validate_lora(adapter, verb="convert")
    record = build_record("convert", sources=[source_entry(adapter)], params={"from": adapter.format, "to": to})
    metadata = with_record(derived_metadata(adapter.metadata), record)
    return adapter.with_modules(adapter.modules, metadata=metadata), to
