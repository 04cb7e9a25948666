"""Run a planned fuse: stream the base once, patch in fp32, write every output in one pass."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lora_tools.engine import Contribution, DenseDifference, StageHook, stream, stream_order
from lora_tools.engine.contributions import BiasDiff, module_contribution
from lora_tools.io.diffusers_folder import SCHEDULER_CONFIG
from lora_tools.io.fp8 import Fp8Error, is_fp8_target
from lora_tools.io.hashing import FULL_HASH_MAX_BYTES
from lora_tools.io.model import TensorRef
from lora_tools.ops.fuse_plan import FusePlan, Method, SaveKind, plan_fuse, preset_title
from lora_tools.output.metadata import output_metadata as build_output_metadata
from lora_tools.output.plan import WrittenFile
from lora_tools.output.sinks import CheckpointSink, ComponentSink, DiffusersFolderSink, tokenizer_provider
from lora_tools.presets import SDXL_BASE_REPO, AccelerationPreset
from lora_tools.provenance import build_record

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
    fp8_error: Fp8Error | None = None  # the weight error of the fp8 rounding (fp8 outputs only)


def fuse(
    base: str | Path,
    preset: str | AccelerationPreset | None = None,
    *,
    method: Method = "lora",
    loras: Sequence[tuple[str, float]] = (),
    saves: Sequence[SaveKind] = ("checkpoint",),
    output: str | Path | None = None,
    dtype: str = "keep",
    preset_strength: float | None = None,
    preset_dir: str | Path | None = None,
    allow_unmatched: bool = False,
    force: bool = False,
    overwrite: bool = False,
    revision: str | None = None,
    original_unet: str | Path | None = None,
    variant: str | None = None,
    hash_base: bool = False,
    fp8: str | None = None,
    progress: Progress | None = None,
    lightning: int | None = None,
    lightning_strength: float | None = None,
    lightning_dir: str | Path | None = None,
) -> FuseResult:
    """Plan and run a fuse in one call.

    Every argument but ``progress`` is :func:`~lora_tools.ops.fuse_plan.plan_fuse`'s (see there);
    ``progress`` is called with the bytes of each tensor once processed.

    Example:
        >>> from lora_tools import fuse
        >>> fuse("juggernaut.safetensors", "lightning-4step")  # -> juggernaut-lightning-4step.safetensors
    """
    plan = plan_fuse(base, preset, method=method, loras=loras, saves=saves, output=output, dtype=dtype,
                     preset_strength=preset_strength, preset_dir=preset_dir, allow_unmatched=allow_unmatched,
                     force=force, overwrite=overwrite, revision=revision, original_unet=original_unet,
                     variant=variant, hash_base=hash_base, fp8=fp8, lightning=lightning,  # type: ignore[arg-type]
                     lightning_strength=lightning_strength, lightning_dir=lightning_dir)
    try:
        return run_fuse(plan, progress=progress)
    finally:
        plan.close()


#: Bases up to this size get a full sha256 in the record by default (a separate pass over the file).
HASH_BASE_LIMIT = FULL_HASH_MAX_BYTES


def base_identity(plan: FusePlan) -> dict[str, object]:
    """How the record names the base: file name, size, a sha256 of its header, and its full
    sha256 when it is small or ``hash_base`` was asked (hashing 7 GB costs ~4 s of CPU), else a
    sampled sha256 (:func:`~lora_tools.io.hashing.file_pin`)."""
    from lora_tools.io.hashing import file_pin, header_sha256
    from lora_tools.io.remote import as_path

    base = plan.base
    entry: dict[str, object] = {"role": "base", "name": base.path.name, "layout": base.layout}
    files = sorted({str(h.path) for h in base.headers()})
    entry["size"] = sum(as_path(f).stat().st_size for f in files)
    entry["header_sha256"] = header_sha256([as_path(f) for f in files])
    if base.layout != "diffusers-folder":
        entry.update(file_pin(base.path, full=True if plan.hash_base else None, sha256=plan.sha256_of))
    return entry


def provenance_record(plan: FusePlan, *, created: str | None = None,
                      run_entry: dict[str, object] | None = None) -> dict[str, object]:
    """The ``loratool`` metadata record of a fuse (``created``: its UTC time, default now; a
    recipe re-run passes the recorded one, so the file comes out bit for bit the same).
    ``run_entry``: the run's self-describing entry (:func:`lora_tools.provenance.operation_entry`),
    recorded under ``recipe`` as every operation's is."""
    sources: list[dict[str, object]] = [base_identity(plan)]
    for s in plan.loras:
        entry: dict[str, object] = {"role": "lora", "name": s.path.name, "strength": s.strength,
                                    "format": s.adapter.format, "sha256": plan.sha256_of(s.path)}
        if s.preset is not None:
            entry["preset"] = s.preset.name
        sources.append(entry)
    for d in plan.diffs:
        sources.append({"role": "unet-difference", "tuned": d.tuned.path.name, "original": d.original.path.name,
                        "strength": d.strength, "preset": d.preset.name if d.preset else None})
    preset = plan.preset.name if plan.preset is not None else None
    return build_record("fuse", sources=sources, sampler=plan.sampler.to_dict() if plan.sampler is not None else None,
                        preset=preset, method=plan.method, lightning_steps=plan.lightning_steps,
                        output_dtype=f"F8_E4M3 {plan.fp8}" if plan.fp8 else (plan.out_dtype or "keep"), created=created,
                        **({"recipe": run_entry} if run_entry is not None else {}))


def output_metadata(plan: FusePlan, record: dict[str, object], *, keep_base: bool) -> dict[str, str]:
    stem = plan.base.path.name if plan.base.path.is_dir() else plan.base.path.stem
    title = stem + (f" {preset_title(plan.preset.name)}" if plan.preset is not None else " (fused)")
    merged = [plan.base.path.name] + [s.path.name for s in plan.loras] + [d.tuned.path.name for d in plan.diffs]
    return build_output_metadata(record, title=title, merged_from=merged, base_metadata=plan.base.metadata,
                                 keep_base=keep_base,
                                 usage_hint=plan.sampler.describe() if plan.sampler is not None else None,
                                 prediction_type=plan.sampler.prediction_type if plan.sampler is not None else None)


def scheduler_config(plan: FusePlan) -> dict[str, object]:
    cfg = dict(SCHEDULER_CONFIG)
    if plan.sampler is not None:
        cfg.update({"_class_name": plan.sampler.scheduler, "timestep_spacing": plan.sampler.timestep_spacing,
                    "prediction_type": plan.sampler.prediction_type})
    return cfg


def fuse_patches(plan: FusePlan) -> dict[str, list[Contribution]]:
    """The plan as the engine's patch list: per patched key, its LoRA modules (in the order the
    LoRAs were given) then the UNet differences."""
    patches: dict[str, list[Contribution]] = {}
    for key in plan.patched_keys():
        ref = plan.base.ref(key)
        contribs: list[Contribution] = []
        for source, mm in plan.patches.get(key, []):
            rows = None
            if mm.target.part is not None:
                i, n = mm.target.part
                count = ref.shape[0] // n
                rows = slice(i * count, (i + 1) * count)
            keys = mm.module.keys
            up, down = source.max_abs.get(keys.get("up", "")), source.max_abs.get(keys.get("down", ""))
            bounds = (up, down) if up is not None and down is not None else None
            contribs.append(module_contribution(source.adapter, mm, key, source.strength, rows, bounds))
        row = ref.rows[0] if ref.rows else None
        if row is not None and row.component == "unet" and row.diffusers is not None:
            contribs.extend(DenseDifference(d.tuned, d.original, row.diffusers, d.strength) for d in plan.diffs)
        patches[key] = contribs
    return patches


def run_fuse(plan: FusePlan, *, progress: Progress | None = None, stage_hook: StageHook | None = None,
             created: str | None = None, run_entry: dict[str, object] | None = None) -> FuseResult:
    """Stream the base once and write every planned output.

    Args:
        plan: from :func:`~lora_tools.ops.fuse_plan.plan_fuse`.
        progress: called with the bytes of each tensor once processed.
        stage_hook: wraps the engine's read/process/write stages (see :func:`lora_tools.engine.stream`).
        created: the UTC time to record (a recipe's, so a rebuild is bit-identical); default now.
        run_entry: the run's entry to record (see :func:`provenance_record`).
    """
    start = time.perf_counter()
    record = provenance_record(plan, created=created, run_entry=run_entry)
    patches = fuse_patches(plan)
    order = stream_order(plan.base.refs, set(patches) | _rounded_to_fp8(plan))
    fp8_error = Fp8Error() if plan.fp8 is not None else None
    sinks = _make_sinks(plan, record, order, fp8_error)
    stats = stream(plan.base, patches, sinks, out_dtype=plan.output_dtype, order=order, progress=progress,
                   stage_hook=stage_hook)
    # A module with a weight delta and a bias diff is two contributions but one module fused.
    both = sum(isinstance(c, BiasDiff) and c.match.module.changes_weight for cs in patches.values() for c in cs)
    return FuseResult(stats.files, stats.contributions - both, stats.tensors_patched, time.perf_counter() - start,
                      record, fp8_error)


def _rounded_to_fp8(plan: FusePlan) -> set[str]:
    """The base's tensors an fp8 output rounds (computed like the patched ones: not copied while torch loads)."""
    if plan.fp8 is None:
        return set()
    return {r.key for r in plan.base.refs
            if is_fp8_target(r.rows[0].component if r.rows else None, r.key, r.shape, plan.fp8)}


def _sdxl_tokenizers() -> dict[str, Path]:
    from lora_tools.hub import tokenizer_files

    return tokenizer_files(SDXL_BASE_REPO)


def _make_sinks(plan: FusePlan, record: dict[str, object], order: list[TensorRef],
                fp8_error: Fp8Error | None = None) -> list:
    if plan.fp8 is not None:
        assert fp8_error is not None
        return _fp8_sinks(plan, record, order, fp8_error)
    sinks: list = []
    tokenizers = tokenizer_provider(plan.base, _sdxl_tokenizers) if any(o.kind == "diffusers" for o in plan.outputs) else None
    try:
        for out in plan.outputs:
            if out.kind == "checkpoint":  # a diffusers base becomes the SGM keys of every component it holds
                sinks.append(CheckpointSink(out.path, order, plan.output_dtype, output_metadata(plan, record, keep_base=True),
                                            overwrite=plan.overwrite, verify=plan.verify_output, hash=plan.hash_output))
            elif out.kind == "unet":
                sinks.append(ComponentSink(out.path, order, "unet", plan.output_dtype, output_metadata(plan, record, keep_base=False),
                                           overwrite=plan.overwrite, verify=plan.verify_output, hash=plan.hash_output))
            else:
                assert tokenizers is not None
                sinks.append(DiffusersFolderSink(out.path, plan.base, order, plan.output_dtype,
                                                 output_metadata(plan, record, keep_base=False), scheduler_config(plan), tokenizers,
                                                 overwrite=plan.overwrite, verify=plan.verify_output, hash=plan.hash_output))
    except BaseException:
        for s in sinks:
            s.abort()
        raise
    return sinks


def _fp8_sinks(plan: FusePlan, record: dict[str, object], order: list[TensorRef], error: Fp8Error) -> list:
    """The sinks of an fp8 fuse (single file and/or standalone UNet; the plan refused a diffusers folder)."""
    from lora_tools.output.fp8_sinks import Fp8CheckpointSink, Fp8ComponentSink

    assert plan.fp8 is not None
    sinks: list = []
    try:
        for out in plan.outputs:
            keep_base = out.kind == "checkpoint"
            sink_type = Fp8CheckpointSink if keep_base else Fp8ComponentSink
            sinks.append(sink_type(out.path, order, lambda d: d, output_metadata(plan, record, keep_base=keep_base),
                                   form=plan.fp8, error=error, overwrite=plan.overwrite, verify=plan.verify_output,
                                   hash=plan.hash_output))
    except BaseException:
        for s in sinks:
            s.abort()
        raise
    return sinks
