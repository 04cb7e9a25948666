"""The fp8 outputs of a fuse: a single file or a standalone UNet whose UNet linear weights (and, in the plain
form, conv weights) are float8_e4m3fn (:mod:`lora_tools.io.fp8` holds the rules and the encoding).

An fp8 target the LoRAs patch is rounded by the engine, row block by row block while each fp32 block
of the fusion is in the cache (:meth:`block_encoding`; the codes land in a buffer in phase with the
tensor's place in the file, which the writer sends uncopied). Where that cannot be (a whole-tensor
contribution such as DoRA, or outputs that want the values themselves) the engine patches it in fp32
(:meth:`patch_dtype`) and :meth:`prepare` rounds that value once; an untouched target is rounded there
from its read bytes. The other tensors keep their dtype, are patched in it like in any fuse, and go
through the ordinary sink path (uncopied when their bytes are right).
In the scaled form the file also plans ``<module>.scale_weight`` (fp32 scalar, written just before
its weight) and the 2-element ``scaled_fp8`` marker (the first tensor of the file).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lora_tools.errors import NonFiniteError
from lora_tools.io import fp8
from lora_tools.io.model import TensorRef
from lora_tools.io.safetensors import StreamingWriter, TensorPlan, is_float_dtype, torch_dtype
from lora_tools.layouts.sdxl import to_diffusers
from lora_tools.layouts.table import KeyMap
from lora_tools.output.sinks import CheckpointSink, ComponentSink, DtypeFor, Payload, _emit, _FileSink

if TYPE_CHECKING:
    import torch


def _component(ref: TensorRef) -> str | None:
    return ref.rows[0].component if ref.rows else None


class _Fp8Emitter:
    """Plans and writes the tensors of one fp8 output file."""

    def __init__(self, form: fp8.Fp8Form, keep: DtypeFor, error: fp8.Fp8Error, marker_prefix: str):
        self.form, self.keep, self.error, self.marker_prefix = form, keep, error, marker_prefix

    def plans(self, entries: Sequence[tuple[str, str | None, str, tuple[int, ...]]]) -> list[TensorPlan]:
        """(name, component, dtype, shape) of each tensor, in order -> the file's plan."""
        out = ([TensorPlan(fp8.marker_key(self.marker_prefix), fp8.FP8_DTYPE, fp8.MARKER_SHAPE)]
               if self.form == "scaled" else [])
        for name, component, dtype, shape in entries:
            if fp8.is_fp8_target(component, name, shape, self.form):
                if self.form == "scaled":
                    out.append(TensorPlan(fp8.scale_key(name), "F32", ()))
                out.append(TensorPlan(name, fp8.FP8_DTYPE, shape))
            else:
                out.append(TensorPlan(name, self.keep(dtype), shape))
        return out

    def start(self, writer: StreamingWriter) -> None:
        if self.form == "scaled":
            writer.write(fp8.marker_key(self.marker_prefix), bytes(math.prod(fp8.MARKER_SHAPE)))

    def prepare(self, ref: TensorRef, payload: Payload) -> None:
        """Round an fp8 target once, on a compute thread (every fp8 output of the run takes that
        rounding), with the largest magnitude the engine measured while patching; the fp32 result
        is then dropped (it is four times the size of its fp8 form)."""
        if not fp8.is_fp8_target(_component(ref), ref.key, ref.shape, self.form) or _rounded(payload, self.form):
            return
        drop = payload.patched and payload.tensor is not None and all(row.keeps_values for row in ref.rows)
        payload.encoded = (self.form, *fp8.quantize_measured(payload.as_tensor(ref), self.form, amax=payload.amax,
                                                             consume=drop, into=payload.spare))
        if drop:
            payload.tensor = None

    def block_encoding(self, ref: TensorRef, names: Sequence[tuple[str, tuple[int, ...], bool]]) -> fp8.Fp8Encoding | None:
        """The encoding the engine may apply while patching ``ref`` (its fp32 value is then never made):
        when each of its ``(name, shape, keeps_values)`` in this file is an fp8 target keeping every value."""
        if names and all(fp8.is_fp8_target(_component(ref), name, shape, self.form) and keeps
                         for name, shape, keeps in names):
            return fp8.Fp8Encoding(self.form)
        return None

    def emit(self, writer: StreamingWriter, name: str, ref: TensorRef, payload: Payload, row: KeyMap | None,
             shape: tuple[int, ...]) -> None:
        if not fp8.is_fp8_target(_component(ref), name, shape, self.form):
            _emit(writer, name, ref, payload, self.keep(ref.dtype), row)
            if payload.patched and payload.tensor is not None and payload.tensor.dtype != torch_dtype(self.keep(ref.dtype)):
                _check_kept(name, payload.tensor, self.keep(ref.dtype))  # patched in fp32 for another output's fp8
            return
        if _rounded(payload, self.form) and (row is None or row.keeps_values):
            _, q, scale, rounding = payload.encoded
            if row is not None:
                q = to_diffusers(row, q)
        else:  # not prepared, or its values move (a slice of the tensor has a scale of its own)
            t = payload.as_tensor(ref)
            if row is not None:
                t = to_diffusers(row, t)
            q, scale, rounding = fp8.quantize_measured(t, self.form)
        self.error.add(ref.key, rounding, scale)
        if scale is not None:  # a power of two: exact in fp32; its 4 bytes as they are (no tensor for a scalar)
            writer.write(fp8.scale_key(name), struct.pack("<f", scale))
        writer.write(name, q.contiguous())



def _exact(ref: TensorRef) -> str | None:
    """fp32 for a float tensor (the fusion, exact, rounded to fp8 once), the engine's default otherwise."""
    return "F32" if is_float_dtype(ref.dtype) else None


def _rounded(payload: Payload, form: fp8.Fp8Form) -> bool:
    return payload.encoded is not None and payload.encoded[0] == form


def _check_kept(name: str, t: torch.Tensor, dtype: str) -> None:
    """A patched tensor kept in fp16/bf16 must still be finite there (the engine computed it in fp32)."""
    import torch

    if dtype in ("F16", "BF16") and not bool(torch.isfinite(t.to(torch_dtype(dtype))).all()):
        raise NonFiniteError(f"Fusing produced values beyond the range of {dtype} in '{name}'.")


class Fp8CheckpointSink(CheckpointSink):
    """The whole single file, its UNet weights in fp8 (``model.diffusion_model.scaled_fp8`` marker)."""

    def __init__(self, path: Path, refs: Sequence[TensorRef], keep: DtypeFor, metadata: Mapping[str, str], *,
                 form: fp8.Fp8Form, error: fp8.Fp8Error, overwrite: bool = True, verify: bool = False,
                 hash: bool | None = None):
        self.fp8 = _Fp8Emitter(form, keep, error, fp8.SGM_UNET_PREFIX)
        plans = self.fp8.plans([(r.key, _component(r), r.dtype, r.shape) for r in refs])
        _FileSink.__init__(self, path, plans, keep, metadata, overwrite=overwrite, verify=verify, hash=hash)
        self.fp8.start(self.writer)

    def patch_dtype(self, ref: TensorRef) -> str | None:
        return _exact(ref) if fp8.is_fp8_target(_component(ref), ref.key, ref.shape, self.fp8.form) else None

    def prepare(self, ref: TensorRef, payload: Payload) -> None:
        self.fp8.prepare(ref, payload)

    def block_encoding(self, ref: TensorRef) -> fp8.Fp8Encoding | None:
        return self.fp8.block_encoding(ref, [(ref.key, ref.shape, True)])

    def add(self, ref: TensorRef, payload: Payload) -> None:
        self.fp8.emit(self.writer, ref.key, ref, payload, None, ref.shape)

    def writes_raw(self, ref: TensorRef) -> bool:
        return not fp8.is_fp8_target(_component(ref), ref.key, ref.shape, self.fp8.form) and super().writes_raw(ref)


class Fp8ComponentSink(ComponentSink):
    """A standalone diffusers-layout UNet, its linear (plain: and conv) weights in fp8 (``scaled_fp8`` marker)."""

    def __init__(self, path: Path, refs: Sequence[TensorRef], keep: DtypeFor, metadata: Mapping[str, str], *,
                 form: fp8.Fp8Form, error: fp8.Fp8Error, overwrite: bool = True, verify: bool = False,
                 hash: bool | None = None):
        self.component = "unet"
        self.kind = "unet"
        self.fp8 = _Fp8Emitter(form, keep, error, "")
        entries = [(row.diffusers, "unet", r.dtype, row.diffusers_shape) for r in refs if self.wants(r)
                   for row in r.rows]
        plans = self.fp8.plans(entries)  # type: ignore[arg-type]
        _FileSink.__init__(self, path, plans, keep, metadata, overwrite=overwrite, verify=verify, hash=hash)
        self.fp8.start(self.writer)

    def patch_dtype(self, ref: TensorRef) -> str | None:
        targets = self.wants(ref) and any(
            fp8.is_fp8_target("unet", row.diffusers, row.diffusers_shape, self.fp8.form)  # type: ignore[arg-type]
            for row in ref.rows)
        return _exact(ref) if targets else None

    def prepare(self, ref: TensorRef, payload: Payload) -> None:
        if self.wants(ref):
            self.fp8.prepare(ref, payload)

    def block_encoding(self, ref: TensorRef) -> fp8.Fp8Encoding | None:
        if not self.wants(ref):
            return None
        names = [(row.diffusers, row.diffusers_shape, row.keeps_values) for row in ref.rows if row.diffusers is not None]
        return self.fp8.block_encoding(ref, names) if len(names) == len(ref.rows) else None

    def add(self, ref: TensorRef, payload: Payload) -> None:
        if not self.wants(ref):
            return
        for row in ref.rows:
            self.fp8.emit(self.writer, row.diffusers, ref, payload, row, row.diffusers_shape)  # type: ignore[arg-type]


__all__ = ["Fp8CheckpointSink", "Fp8ComponentSink"]
