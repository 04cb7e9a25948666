"""Writing a derived LoRA: refuse inputs as outputs, then one save through ``save_lora``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from lora_tools.errors import Hint, OutputExistsError, UsageError

if TYPE_CHECKING:
    from lora_tools.lora.adapter import LoraAdapter

_DTYPES = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}


@dataclass(frozen=True, slots=True)
class LoraOutput:
    """Where and how a derived LoRA will be written (checked before any maths runs).

    Attributes:
        path: the output file.
        format: the format to write (``None``: the adapter's own).
        dtype: ``fp16``, ``bf16``, ``fp32`` or ``None`` (keep each factor's dtype).
        overwrite: replace an existing file.
    """

    path: Path
    format: str | None = None
    dtype: str | None = None
    overwrite: bool = False


def plan_output(output: str | Path, inputs: Sequence[str | Path], *, format: str | None = None,
                dtype: str | None = None, overwrite: bool = False) -> LoraOutput:
    """Check an output path before anything is computed.

    Raises:
        UsageError: the output is one of the inputs, or an unknown dtype.
        OutputExistsError: the output exists and `overwrite` is not set.
    """
    path = Path(output)
    for src in inputs:
        if os.path.exists(path) and os.path.exists(src) and os.path.samefile(path, src):
            raise UsageError(f"'{path}' is an input; choose another output name (inputs are never overwritten)",
                             hint=Hint(param="output", purpose="to write elsewhere", value="PATH"))
    if path.exists() and not overwrite:
        raise OutputExistsError(f"'{path}' exists", hint=Hint(param="overwrite", purpose="to replace it"))
    if dtype is not None and dtype != "keep" and dtype not in _DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; expected fp16, bf16, fp32 or keep")
    return LoraOutput(path, format, None if dtype in (None, "keep") else dtype, overwrite)


def write_lora(adapter: "LoraAdapter", out: LoraOutput) -> Path:
    """Write `adapter` (its metadata carries the ``loratool`` record) to the planned output."""
    from lora_tools.lora.save import save_lora

    save_lora(adapter, out.path, format=out.format, metadata=adapter.metadata, dtype=out.dtype,
              overwrite=out.overwrite)
    return out.path


def tensor_bytes(adapter: "LoraAdapter", dtype: str | None) -> int:
    """Bytes of the adapter's factor tensors at `dtype` (``None``: as stored)."""
    import torch

    item = {"fp16": 2, "bf16": 2, "fp32": 4}.get(dtype or "", 0)
    total = 0
    for m in adapter.modules:
        for role in m.keys:
            t = m.factor(role)
            total += t.numel() * (item or t.element_size()) if isinstance(t, torch.Tensor) else 0
    return total
