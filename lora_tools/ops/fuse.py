"""Run a planned fuse: stream the base once, patch in fp32, write every output in one pass."""

from __future__ import annotations

import datetime as _dt
import gc
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lora_tools import __version__
from lora_tools.models import TensorRef
from lora_tools.ops.fuse_plan import FusePlan, plan_fuse
from lora_tools.ops.buffers import BufferRing
from lora_tools.ops.patching import patch_ops, patch_tensor
from lora_tools.ops.outputs import (CheckpointSink, ComponentSink, DiffusersFolderSink, Payload, WrittenFile,
                                    tokenizer_provider)
from lora_tools.ops.streaming import run_pipeline
from lora_tools.provenance import LORATOOL_METADATA_KEY
from lora_tools.safetensors_io import DTYPE_SIZES, torch_dtype
from lora_tools.diffusers_folder import SCHEDULER_CONFIG

logger = logging.getLogger(__name__)

Progress = Callable[[int], None]


@dataclass
class FuseResult:
    """What a fuse wrote, and how long it took."""

    files: list[WrittenFile]
    modules_fused: int
    tensors_patched: int
    seconds: float
    record: dict[str, object] = field(default_factory=dict)


def fuse(base: str | Path, **kwargs: object) -> FuseResult:
    """Plan and run a fuse in one call (arguments as :func:`~lora_tools.ops.fuse_plan.plan_fuse`).

    Example:
        >>> from lora_tools import fuse
        >>> fuse("juggernaut.safetensors", lightning=4)  # -> juggernaut-lightning-4step.safetensors
    """
    progress = kwargs.pop("progress", None)
    plan = plan_fuse(base, **kwargs)  # type: ignore[arg-type]
    try:
        return run_fuse(plan, progress=progress)  # type: ignore[arg-type]
    finally:
        plan.close()


#: Bases up to this size get a full sha256 in the record by default (a separate pass over the file).
HASH_BASE_LIMIT = 2 << 30


def base_identity(plan: FusePlan) -> dict[str, object]:
    """How the record names the base: file name, size, a sha256 of its header, and its full
    sha256 when it is small or ``hash_base`` was asked (hashing 7 GB costs ~4 s of CPU)."""
    import hashlib

    from lora_tools.hub import sha256_file

    base = plan.base
    entry: dict[str, object] = {"role": "base", "name": base.path.name, "layout": base.layout}
    files = sorted({str(h.path) for h in base.headers()})
    entry["size"] = sum(Path(f).stat().st_size for f in files)
    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            digest.update(fh.read(n))
    entry["header_sha256"] = digest.hexdigest()
    if base.layout != "diffusers-folder" and (plan.hash_base or int(entry["size"]) <= HASH_BASE_LIMIT):  # type: ignore[call-overload]
        entry["sha256"] = sha256_file(base.path)
    return entry


def provenance_record(plan: FusePlan, *, created: str | None = None) -> dict[str, object]:
    """The ``loratool`` metadata record of a fuse (``created``: its UTC time, default now; a
    recipe re-run passes the recorded one, so the file comes out bit for bit the same)."""
    sources: list[dict[str, object]] = [base_identity(plan)]
    for s in plan.loras:
        entry: dict[str, object] = {"role": "lora", "name": s.adapter.path.name, "strength": s.strength,
                                    "format": s.adapter.format, "sha256": plan.sha256_of(s.adapter.path)}
        if s.preset is not None:
            entry["preset"] = s.preset.name
        sources.append(entry)
    for d in plan.diffs:
        sources.append({"role": "unet-difference", "tuned": d.tuned.path.name, "original": d.original.path.name,
                        "strength": d.strength, "preset": d.preset.name if d.preset else None})
    record: dict[str, object] = {
        "version": __version__, "operation": "fuse", "method": plan.method, "lightning_steps": plan.lightning_steps,
        "sources": sources, "output_dtype": plan.out_dtype or "keep",
        "created": created or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if plan.sampler is not None:
        record["sampler"] = plan.sampler.to_dict()
    return record


def output_metadata(plan: FusePlan, record: dict[str, object], *, keep_base: bool) -> dict[str, str]:
    meta: dict[str, str] = dict(plan.base.metadata) if keep_base else {"format": "pt"}
    stem = plan.base.path.name if plan.base.path.is_dir() else plan.base.path.stem
    title = stem + (f" Lightning {plan.lightning_steps}-step" if plan.lightning_steps else " (fused)")
    merged = [plan.base.path.name] + [s.adapter.path.name for s in plan.loras] + [d.tuned.path.name for d in plan.diffs]
    meta.update({
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "modelspec.resolution": "1024x1024",
        "modelspec.date": str(record["created"])[:10],
        "modelspec.merged_from": ", ".join(merged),
    })
    if plan.sampler is not None:
        meta["modelspec.usage_hint"] = plan.sampler.describe()
        meta["modelspec.prediction_type"] = plan.sampler.prediction_type
    meta[LORATOOL_METADATA_KEY] = json.dumps(record, sort_keys=True)
    return meta


def scheduler_config(plan: FusePlan) -> dict[str, object]:
    cfg = dict(SCHEDULER_CONFIG)
    if plan.sampler is not None:
        cfg.update({"_class_name": plan.sampler.scheduler, "timestep_spacing": plan.sampler.timestep_spacing,
                    "prediction_type": plan.sampler.prediction_type})
    return cfg


def run_fuse(plan: FusePlan, *, progress: Progress | None = None, created: str | None = None) -> FuseResult:
    """Stream the base once and write every planned output."""
    start = time.perf_counter()
    record = provenance_record(plan, created=created)
    patched = plan.patched_keys()
    order = interleave(plan.base.refs, patched)
    sinks = _make_sinks(plan, record, order)
    order = [r for r in order if any(s.wants(r) for s in sinks)]  # e.g. --save unet reads no VAE
    stats = {"modules": 0, "tensors": 0}
    base = plan.base

    buffers = BufferRing()
    first = sinks[0]

    def read(ref: TensorRef) -> Payload:
        # The reader thread also reads this tensor's LoRA factors, off the compute thread.
        ops = patch_ops(plan, ref) if ref.key in patched else None
        if ref.raw_ok:
            # Placed in phase with its place in the first output, the writer sends it to the disk
            # from this buffer, uncopied; tensors the file leaves unaligned get aligned memory.
            phase = first.position(ref) or 0
            into = buffers.take(ref.nbytes, phase if phase % DTYPE_SIZES[ref.dtype] == 0 else 0)
            return Payload(base.read_raw(ref, into), None, False, ops)
        return Payload(None, base.read(ref), False, ops)

    def process(ref: TensorRef, payload: Payload) -> Payload:
        if ref.key not in patched:
            return payload
        source = payload.as_tensor(ref)
        out, applied = patch_tensor(plan, ref, source, torch_dtype(plan.output_dtype(ref.dtype)), payload.ops)
        stats["modules"] += applied
        stats["tensors"] += 1
        if out is source:  # the read buffer now holds the result
            return Payload(payload.raw, out, True)
        if payload.raw is not None:
            buffers.give(payload.raw)
        return Payload(None, out, True)

    def write(ref: TensorRef, payload: Payload) -> None:
        for s in sinks:
            s.add(ref, payload)
        if payload.raw is not None:
            buffers.give(payload.raw)

    import torch

    gc.freeze()  # the collector would otherwise rescan torch's million import-time objects, over and over
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))  # one core stays free for reading, writing, hashing
    try:
        run_pipeline(order, read=read, process=process, write=write, size=lambda r: r.nbytes,
                     on_done=(lambda r: progress(r.nbytes)) if progress else None)
        files = [f for s in sinks for f in s.finalize()]
    except BaseException:
        for s in sinks:
            s.abort()
        raise
    finally:
        torch.set_num_threads(threads)
        gc.unfreeze()
    return FuseResult(files, stats["modules"], stats["tensors"], time.perf_counter() - start, record)


def interleave(refs: list[TensorRef], patched: set[str]) -> list[TensorRef]:
    """Processing (and output) order: patched and untouched tensors mixed in proportion to
    their bytes, so the maths and the copying overlap all the way through instead of taking
    turns (a checkpoint stores its text encoders and VAE, all untouched, in one run)."""
    hot = [r for r in refs if r.key in patched]
    cold = [r for r in refs if r.key not in patched]
    hot_total = sum(r.nbytes for r in hot) or 1
    cold_total = sum(r.nbytes for r in cold) or 1
    out: list[TensorRef] = []
    i = j = hot_done = cold_done = 0
    while i < len(hot) or j < len(cold):
        if j >= len(cold) or (i < len(hot) and hot_done / hot_total <= cold_done / cold_total):
            out.append(hot[i])
            hot_done += hot[i].nbytes
            i += 1
        else:
            out.append(cold[j])
            cold_done += cold[j].nbytes
            j += 1
    return out


def _make_sinks(plan: FusePlan, record: dict[str, object], order: list[TensorRef]) -> list:  # type: ignore[type-arg]
    sinks: list = []  # type: ignore[type-arg]
    tokenizers = tokenizer_provider(plan.base, None) if any(o.kind == "diffusers" for o in plan.outputs) else None
    try:
        for out in plan.outputs:
            if out.kind == "checkpoint":  # a diffusers base becomes the SGM keys of every component it holds
                sinks.append(CheckpointSink(out.path, order, plan.output_dtype, output_metadata(plan, record, keep_base=True)))
            elif out.kind == "unet":
                sinks.append(ComponentSink(out.path, order, "unet", plan.output_dtype, output_metadata(plan, record, keep_base=False)))
            else:
                assert tokenizers is not None
                sinks.append(DiffusersFolderSink(out.path, plan.base, order, plan.output_dtype,
                                                 output_metadata(plan, record, keep_base=False), scheduler_config(plan), tokenizers))
    except BaseException:
        for s in sinks:
            s.abort()
        raise
    return sinks
