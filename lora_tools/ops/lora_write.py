"""Writing a derived LoRA: refuse inputs as outputs, then one save through ``save_lora``."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_tools.errors import Hint, UsageError
from lora_tools.io.remote import as_path, is_url, url_of
from lora_tools.output.plan import check_output

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
        inputs: the files the operation reads (never the output).
    """

    path: Path
    format: str | None = None
    dtype: str | None = None
    overwrite: bool = False
    inputs: tuple[Path, ...] = ()


def plan_output(output: str | Path, inputs: Sequence[str | Path], *, format: str | None = None,
                dtype: str | None = None, overwrite: bool = False) -> LoraOutput:
    """Check an output path before anything is computed.

    Raises:
        UsageError: the output is one of the inputs, or an unknown dtype.
        OutputExistsError: the output exists and `overwrite` is not set.
        OutputError: the output is a directory, under a file, or in a folder that cannot be
            written (:func:`lora_tools.output.plan.check_output`).
    """
    path = as_path(output)
    for src in inputs:
        if is_url(path) and is_url(src) and url_of(path) == url_of(src):
            raise UsageError(f"'{path}' is an input; choose another output name (inputs are never overwritten)",
                             hint=Hint(param="output", purpose="to write elsewhere", value="PATH"))
        if os.path.exists(path) and os.path.exists(src) and os.path.samefile(path, src):
            raise UsageError(f"'{path}' is an input; choose another output name (inputs are never overwritten)",
                             hint=Hint(param="output", purpose="to write elsewhere", value="PATH"))
    check_output(path, "file", overwrite=overwrite)  # the one output rule: path kind, overwrite, writable folder
    if dtype is not None and dtype != "keep" and dtype not in _DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; expected fp16, bf16, fp32 or keep")
    return LoraOutput(path, format, None if dtype in (None, "keep") else dtype, overwrite,
                      tuple(as_path(p) for p in inputs))


_FLOAT_DTYPES = {"F16": "fp16", "BF16": "bf16", "F32": "fp32"}
_WIDTH = {"fp16": 2, "bf16": 2, "fp32": 4}


def input_dtype(inputs: Sequence[str | Path]) -> str | None:
    """The float dtype most tensors of ``inputs`` are stored in (the wider one on a tie); a diffusers folder is
    read through its UNet file; ``None`` when no input can be read (the factors' own dtype is kept then)."""
    from lora_tools.io.safetensors import read_header

    counts: dict[str, int] = {}
    for src in inputs:
        path = as_path(src)
        if path.is_dir():
            path = path / "unet" / "diffusion_pytorch_model.safetensors"
        if not path.is_file() or path.suffix != ".safetensors":
            continue
        try:
            header = read_header(path)
        except Exception:  # noqa: BLE001 - an unreadable input is reported by the operation itself
            continue
        for t in header.tensors.values():
            name = _FLOAT_DTYPES.get(t.dtype)
            if name is not None:
                counts[name] = counts.get(name, 0) + 1
    if not counts:
        return None
    return max(counts, key=lambda d: (counts[d], _WIDTH[d]))


def write_lora(adapter: LoraAdapter, out: LoraOutput, *, record: Mapping[str, Any] | None = None) -> Path:
    """Write `adapter` to the planned output through :func:`~lora_tools.lora.save.save_lora`, saying which model
    it is for (:func:`lora_tools.lora.family.made_for`, :func:`lora_tools.output.metadata.lora_base_metadata`):
    every LoRA-writing operation (rescale, resize, merge, convert, extract) writes through here.

    Args:
        adapter: the derived LoRA.
        out: the output from :func:`plan_output`.
        record: the operation's ``loratool`` record (:func:`lora_tools.provenance.build_record`);
            default: the record the operation put in ``adapter.metadata`` (``rescale``, ``merge``,
            ``convert``...), so the file names the operation that made it, not a generic save.

    Raises:
        UsageError: `adapter` carries no record and none is given (a derived LoRA always has one).
    """
    from lora_tools.lora.family import made_for
    from lora_tools.lora.save import save_lora
    from lora_tools.output.metadata import lora_base_metadata
    from lora_tools.provenance import read_record

    rec = record if record is not None else read_record(adapter.metadata)
    if rec is None:
        raise UsageError("a derived LoRA needs the loratool record of the operation that made it",
                         hint=Hint(param="record", purpose="from lora_tools.provenance.build_record"))
    metadata = lora_base_metadata(adapter.metadata, made_for(adapter), title=out.path.stem)
    return save_lora(adapter, out.path, format=out.format, metadata=metadata, dtype=out.dtype,
                     overwrite=out.overwrite, record=rec, inputs=out.inputs)


def tensor_bytes(adapter: LoraAdapter, dtype: str | None) -> int:
    """Bytes of the adapter's factor tensors at `dtype` (``None``: as stored)."""
    import torch

    item = {"fp16": 2, "bf16": 2, "fp32": 4}.get(dtype or "", 0)
    total = 0
    for m in adapter.modules:
        for role in m.keys:
            t = m.factor(role)
            total += t.numel() * (item or t.element_size()) if isinstance(t, torch.Tensor) else 0
    return total
