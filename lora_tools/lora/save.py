"""Write a :class:`~lora_tools.lora.adapter.LoraAdapter` in any format, losslessly.

Plan, then run: :func:`plan_save` spells every key and decides every dtype and the metadata from
headers alone; :func:`save_lora` writes the tensors through the one output path,
:func:`lora_tools.output.sinks.write_safetensors`. Module names are translated between naming
families through the SDXL layout tables (dictionary look-ups, no string guessing); a module that
keeps its family keeps its exact key spelling, so ``save_lora(load_lora(f), g)`` writes the same
keys and the same bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_tools import provenance
from lora_tools.errors import Hint, KeyMismatchError, NonFiniteError, UsageError
from lora_tools.io.safetensors import DTYPE_ALIASES, is_float_dtype
from lora_tools.layouts.table import SGM_PREFIXES, Component, module_of
from lora_tools.lora import peft_meta
from lora_tools.lora.adapter import LoraAdapter, LoraModule
from lora_tools.lora.formats import FORMATS, Format, get_format
from lora_tools.lora.scale import module_scale
from lora_tools.lora.spelling import NAMINGS, PROCESSOR, spell_key

if TYPE_CHECKING:
    import torch

    from lora_tools.layouts.targets import ModuleTarget, TargetIndex

_ATTN_PROJ = (".to_q", ".to_k", ".to_v", ".to_out.0")


@dataclass(frozen=True, slots=True)
class PlannedTensor:
    """One tensor of the output: its key, dtype, shape, and where its value comes from."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    module: LoraModule
    role: str  # a factor role, or "alpha"


@dataclass(frozen=True)
class SavePlan:
    """Everything :func:`save_lora` will write, decided from headers only."""

    format: Format
    tensors: list[PlannedTensor]
    metadata: dict[str, str]


def plan_save(adapter: LoraAdapter, *, format: str | None = None, metadata: Mapping[str, str] | None = None,
              dtype: str | None = None) -> SavePlan:
    """Spell every key of ``adapter`` in ``format`` and decide dtypes and metadata.

    Args:
        adapter: the LoRA (file-backed or in memory).
        format: the output format (default: the adapter's own).
        metadata: the output's metadata (default: the adapter's); lora_tools adds its record.
        dtype: cast every floating tensor to this dtype (``fp16``, ``bf16``, ``fp32``); default keeps each.

    Raises:
        UnknownFormatError: ``format`` is not a format name.
        UsageError: a module cannot be spelled in ``format`` (no envelope for its component, or its
            name has no counterpart in the format's naming family).
    """
    fmt = get_format(format or adapter.format)
    cast = None if dtype is None else DTYPE_ALIASES.get(dtype.lower(), dtype.upper())
    if cast is not None and cast not in ("F16", "BF16", "F32", "F64"):
        raise UsageError(f"cannot write LoRA tensors as '{dtype}'", hint=Hint("dtype", "as fp16, bf16 or fp32", "DTYPE"))
    out: list[PlannedTensor] = []
    seen: dict[str, str] = {}
    for m in adapter.modules:
        envelope, name, spelling = spell_module(m, fmt)
        for role in m.keys:
            key = spell_key(envelope, name, role, spelling, m.kind) or spell_key(envelope, name, role, "kohya", m.kind)
            assert key is not None
            out.append(PlannedTensor(key, _dtype(m.factor_dtype(role), cast), m.factor_shape(role), m, role))
        # Alphas of LyCORIS modules have no LoraConfig field: they stay tensors in every format.
        if m.alpha is not None and (fmt.alphas == "tensor" or m.kind != "lora"
                                    or (m.alpha_meta is not None and _same_family(m, fmt))):
            key = spell_key(envelope, name, "alpha", spelling) or spell_key(envelope, name, "alpha", "kohya")
            assert key is not None
            meta = m.alpha_meta
            adt = meta.dtype if meta is not None else m.factor_dtype(next(iter(m.keys)))
            out.append(PlannedTensor(key, _dtype(adt, cast), meta.shape if meta is not None else (), m, "alpha"))
    for t in out:
        if t.key in seen:
            raise KeyMismatchError(f"two modules spell the same key '{t.key}' in {fmt.name} ({seen[t.key]}, {t.module.name}).")
        seen[t.key] = t.module.name
    md = dict(adapter.metadata if metadata is None else metadata)
    if fmt.alphas != "tensor":
        _put_peft_metadata(md, adapter.modules, fmt)
    elif adapter.format in FORMATS and FORMATS[adapter.format].alphas != "tensor":
        md.pop(peft_meta.METADATA_KEY, None)  # the alphas move into tensors; a stale copy would mislead
    return SavePlan(fmt, out, md)


def save_lora(adapter: LoraAdapter, path: str | os.PathLike[str], *, format: str | None = None,
              metadata: Mapping[str, str] | None = None, dtype: str | None = None, overwrite: bool = False,
              record: Mapping[str, Any] | None = None, inputs: Sequence[str | os.PathLike[str]] = ()) -> Path:
    """Write ``adapter`` as a safetensors LoRA in ``format``, with a ``loratool`` record, through the
    one output path (:func:`lora_tools.output.sinks.write_safetensors`: atomic write, permissions,
    stale-temp cleanup, header re-check, the overwrite rule, inputs never outputs).

    Args:
        adapter: the LoRA (from :func:`~lora_tools.lora.load.load_lora`, or built in memory).
        path: the output file.
        format: the output format (default: the adapter's own, so a round trip is exact).
        metadata: the output's metadata (default: the adapter's).
        dtype: cast floating tensors to ``fp16``/``bf16``/``fp32`` (default: keep each one's).
        overwrite: replace an existing file.
        record: the ``loratool`` record (:func:`lora_tools.provenance.build_record`) of the operation
            that made ``adapter`` (``rescale``, ``merge``...); default: a ``save`` record naming the
            adapter's file (with its sha256) and the format and dtype written.
        inputs: further files the operation read (none may be the output; the adapter's own file is
            always one).

    Returns:
        `Path`: the written file.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is not set.
        OutputError: ``path`` cannot be written.
        UsageError: a module cannot be spelled in ``format``, or ``path`` is one of the inputs.

    Example:
        >>> with load_lora("lightning.safetensors") as lora:
        ...     save_lora(lora, "lightning-diffusers.safetensors", format="diffusers")
    """
    from lora_tools.io.remote import as_path
    from lora_tools.output.plan import check_output

    check_output(as_path(path), "file", overwrite=overwrite)  # before any work: the overwrite rule first
    plan = plan_save(adapter, format=format, metadata=metadata, dtype=dtype)
    if record is None:
        record = provenance.build_record("save", sources=[_source(adapter)],
                                         params={"format": plan.format.name, "dtype": dtype})
    sources = [as_path(p) for p in inputs] + ([adapter.path] if adapter.path is not None else [])
    return write_plan(plan, path, metadata=provenance.with_record(plan.metadata, record), overwrite=overwrite,
                      inputs=sources)


def _source(adapter: LoraAdapter) -> dict[str, Any]:
    source: dict[str, Any] = {"role": "lora", "format": adapter.format}
    if adapter.path is not None:
        from lora_tools.io.hashing import sha256_file

        source["name"] = adapter.path.name
        if adapter.path.is_file():
            source["sha256"] = sha256_file(adapter.path)
    return source


def write_plan(plan: SavePlan, path: str | os.PathLike[str], *, metadata: Mapping[str, str] | None = None,
               overwrite: bool = False, inputs: Sequence[Path] = ()) -> Path:
    """Run a :class:`SavePlan` through :func:`lora_tools.output.sinks.write_safetensors`, with
    ``metadata`` (default: the plan's, without a ``loratool`` record: :func:`save_lora` adds one).

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is not set.
        OutputError: ``path`` cannot be written.
        UsageError: ``path`` is one of ``inputs``.
    """
    from lora_tools.output.sinks import write_safetensors

    tensors = ((t.key, _value(t)) for t in plan.tensors)
    written = write_safetensors(path, tensors, plan.metadata if metadata is None else metadata,
                                overwrite=overwrite, inputs=inputs, kind="lora")
    return written.path


def spelled_tensors(adapter: LoraAdapter, *, format: str | None = None, metadata: Mapping[str, str] | None = None,
                    dtype: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata :func:`save_lora` would write (without its record), in memory."""
    plan = plan_save(adapter, format=format, metadata=metadata, dtype=dtype)
    return {t.key: _value(t) for t in plan.tensors}, plan.metadata


def _value(t: PlannedTensor) -> torch.Tensor:
    import torch

    from lora_tools.io.safetensors import torch_dtype

    want = torch_dtype(t.dtype)
    if t.role == "alpha":
        assert t.module.alpha is not None
        value = torch.tensor(t.module.alpha, dtype=torch.float64).reshape(t.shape)
    else:
        value = t.module.factor(t.role)
    out = value if value.dtype == want else value.to(want)
    check_finite(t, value, out)
    return out


def check_finite(t: PlannedTensor, value: torch.Tensor, out: torch.Tensor) -> None:
    """Refuse a derived tensor that holds NaN/Inf, or whose values overflow the output dtype.

    Every tensor of every LoRA writer passes here (:func:`write_plan`, :func:`spelled_tensors`), so
    no command writes a non-finite LoRA. An overflow is refused, not written wider: the hint names
    the dtype parameter that writes it wider on purpose.

    Raises:
        NonFiniteError: names the module, the tensor and the output dtype.
    """
    import torch

    if not value.is_floating_point():
        return
    where = f"module '{t.module.component}:{t.module.name}' ({t.key})"
    if bool(torch.isnan(value).any()):
        raise NonFiniteError(f"the result holds NaN in {where}: nothing was written. Check the strengths, "
                             "weights and inputs (loratool inspect).")
    if not bool(torch.isfinite(value).all()):  # computed in its own dtype, and overflowed there
        name = str(value.dtype).replace("torch.", "")
        raise NonFiniteError(f"the result overflows {name} in {where}: nothing was written. Use a smaller "
                             "strength or weight.")
    if out is not value and out.is_floating_point() and not bool(torch.isfinite(out).all()):
        name = str(out.dtype).replace("torch.", "")
        raise NonFiniteError(f"the result overflows {name} in {where} (largest |value| "
                             f"{float(value.abs().max()):.3g}): nothing was written",
                             hint=Hint("dtype", "to write it wider", "fp32"))


def _dtype(have: str, cast: str | None) -> str:
    return cast if cast is not None and is_float_dtype(have) else have


def _module_format(m: LoraModule) -> str:
    if m.naming == "diffusers" and m.spelling.startswith("legacy"):
        return "diffusers-legacy"
    return m.naming


def _same_family(m: LoraModule, fmt: Format) -> bool:
    mf = _module_format(m)
    if mf == fmt.name:
        return True
    # kohya and kohya-diffusers spell text-encoder modules alike.
    return m.component != "unet" and {mf, fmt.name} <= {"kohya", "kohya-diffusers"}


def spell_module(m: LoraModule, fmt: Format) -> tuple[str, str, str]:
    """``(envelope, module name, spelling)`` of ``m`` in ``fmt``.

    A LoCon-Tucker module (one with a ``mid`` factor) is spelled kohya's way (``lora_up``/``lora_down``/
    ``lora_mid``) in every format: ComfyUI's ``load_lora`` reads ``lora_mid`` only beside ``lora_up``, and no
    other spelling has a mid factor (diffusers cannot load Tucker modules at all).
    """
    envelope, name, spelling = _spell_module(m, fmt)
    return envelope, name, "kohya" if "mid" in m.keys and spelling != PROCESSOR else spelling


def _spell_module(m: LoraModule, fmt: Format) -> tuple[str, str, str]:
    if _same_family(m, fmt) and m.envelope is not None:
        spelling = m.spelling if m.spelling != "mixed" else fmt.spelling
        return m.envelope, m.name, spelling
    envelope = fmt.envelope(m.component)
    if fmt.name == "diffusers-legacy" and m.kind != "lora":
        raise UsageError(f"a diffusers-legacy LoRA cannot hold {m.kind} modules ('{m.name}'): it has up/down factors only",
                         hint=Hint("format", "naming a format that can (diffusers, kohya...)", "NAME"))
    if envelope is None:
        raise UsageError(f"a {fmt.name} LoRA cannot hold {m.component} modules ('{m.name}')",
                         hint=Hint("format", "naming a format that can", "NAME"))
    name = _translate(m, fmt)
    spelling = fmt.spelling
    if fmt.name == "diffusers-legacy":
        if m.component != "unet":
            spelling = "legacy-linear"
        elif name.endswith(_ATTN_PROJ):
            spelling = PROCESSOR
    return envelope, name, spelling


def _translate(m: LoraModule, fmt: Format) -> str:
    """``m.name`` in ``fmt``'s naming family, through the layout tables."""
    src = NAMINGS.get(m.naming)
    dst = fmt.naming
    target = _lookup(m.component, m.name)
    if target is not None:
        if m.component == "unet" and dst.vocabulary == "sgm":
            name = module_of(target.sgm_key)[len(SGM_PREFIXES["unet"]):]
        else:
            name = target.diffusers_module
        return name.replace(".", "_") if dst.underscored else name
    same_vocab = src is not None and (m.component != "unet" or src.vocabulary == dst.vocabulary)
    if same_vocab and src is not None and (not src.underscored or dst.underscored):
        return m.name.replace(".", "_") if dst.underscored else m.name
    raise UsageError(
        f"module '{m.name}' ({m.component}) has no SDXL counterpart to spell it in {fmt.name} names",
        hint=Hint("format", f"naming a format of the {m.naming} family", "NAME"))


def _lookup(component: Component, name: str) -> ModuleTarget | None:
    for index in _indexes():
        t = index.lookup(component, name)
        if t is not None:
            return t
    return None


@lru_cache(maxsize=1)
def _indexes() -> tuple[TargetIndex, ...]:
    from lora_tools.layouts.sdxl import FULL, TINY
    from lora_tools.layouts.targets import TargetIndex

    return TargetIndex(FULL.table), TargetIndex(TINY.table)


def _put_peft_metadata(md: dict[str, str], modules: list[LoraModule], fmt: Format) -> None:
    """Keep ``lora_adapter_metadata`` when it already gives every module its scale; else rebuild it."""
    flat = fmt.alphas == "metadata-flat"
    data = peft_meta.parse(md)
    lora = [(m, spell_module(m, fmt)[1]) for m in modules if m.kind == "lora"]
    if data and all(module_scale(peft_meta.alpha_for(data, m.component, name, m.rank), m.rank) == m.scale
                    for m, name in lora):
        return
    if not data and all(m.alpha is None for m, _ in lora):
        return
    built = peft_meta.build(((m.component, name, m.rank, m.alpha, m.is_dora) for m, name in lora), flat=flat)
    md[peft_meta.METADATA_KEY] = json.dumps(built, sort_keys=True)


__all__ = ["PlannedTensor", "SavePlan", "plan_save", "save_lora", "spell_module", "spelled_tensors", "write_plan"]
