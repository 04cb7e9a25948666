"""Checkpoint analysis: single files, bare diffusers UNets and diffusers pipeline folders."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_tools.errors import InvalidFileError, LoraToolsError
from lora_tools.io.diffusers_folder import component_weight_files
from lora_tools.io.sources import open_source
from lora_tools.layouts.components import COMPONENTS
from lora_tools.layouts.detect import CheckpointKind, detect_checkpoint
from lora_tools.layouts.table import SGM_PREFIXES
from lora_tools.ops.inspect._common import count, numel_sum, read_json, summarise_metadata, tensor_entry
from lora_tools.ops.inspect.acceleration import acceleration
from lora_tools.ops.inspect.report import (
    CheckpointSummary,
    ComponentSummary,
    FileSummary,
    InspectReport,
    Provenance,
    TensorEntry,
)
from lora_tools.provenance import fused_preset, read_record

logger = logging.getLogger(__name__)


@dataclass
class FolderInfo:
    """What a pipeline folder adds to its weights: class name, scheduler prediction, files per component."""

    pipeline: str | None
    prediction_type: str | None
    components: dict[str, tuple[tuple[str, ...], list[TensorEntry]]]


def checkpoint_summary(name: str, sha256: str | None, kind: CheckpointKind, entries: Iterable[TensorEntry],
                       metadata: Mapping[str, str], folder: FolderInfo | None) -> CheckpointSummary:
    """The :class:`CheckpointSummary` of a checkpoint's tensors and metadata."""
    entries = list(entries)
    components: dict[str, ComponentSummary] = {}
    if folder is not None:
        for comp, (files, comp_entries) in folder.components.items():
            components[comp] = _component_summary(comp_entries, files)
    elif kind.layout == "diffusers-unet":
        components["unet"] = _component_summary(entries)
    else:
        for comp in kind.components:
            prefix = SGM_PREFIXES[comp]
            components[comp] = _component_summary([e for e in entries if e.key.startswith(prefix)])
    provenance = _provenance(metadata)
    prediction, source = kind.prediction, "markers" if kind.markers else "default"
    if folder is not None and folder.prediction_type:
        prediction, source = folder.prediction_type, "scheduler_config"
    elif not kind.markers and provenance is not None and provenance.sampler:
        recorded = provenance.sampler.get("prediction_type")
        if isinstance(recorded, str) and recorded:
            prediction, source = recorded, "record"  # a 1-step x0 output says "sample"
    accel = acceleration(name, sha256, metadata, False, provenance.lightning_steps if provenance else None)
    warnings = []
    if not kind.supported:
        warnings.append(f"lora_tools cannot fuse into this model: {kind.why_unsupported()}.")
    if prediction not in ("epsilon", "sample"):
        warnings.append(f"The model predicts {prediction}; SDXL-Lightning was distilled for eps-prediction SDXL "
                        f"and will likely misbehave on it.")
    if provenance and provenance.preset:
        warnings.append(f"{_preset_label(provenance.preset)} is already fused into this file.")
    return CheckpointSummary(
        layout="diffusers-folder" if folder is not None else kind.layout,
        architecture=kind.architecture,
        supported=kind.supported,
        why_unsupported=None if kind.supported else kind.why_unsupported(),
        pipeline=folder.pipeline if folder is not None else None,
        components=components,
        prediction=prediction,
        prediction_source=source,
        markers=kind.markers,
        extra_keys=kind.extra_keys,
        acceleration=accel,
        provenance=provenance,
        warnings=tuple(warnings),
    )


def _component_summary(entries: list[TensorEntry], files: tuple[str, ...] = ()) -> ComponentSummary:
    return ComponentSummary(len(entries), numel_sum(entries), count(e.dtype for e in entries), files)


def _preset_label(name: str) -> str:
    """The name people use for a preset (its row's label), or the recorded name of one no row has."""
    from lora_tools.presets import get_preset

    try:
        return get_preset(name).label
    except LoraToolsError:
        return name


def _provenance(metadata: Mapping[str, str]) -> Provenance | None:
    record = read_record(metadata)
    if record is None:
        return None
    fused = []
    for s in record.get("sources") or []:
        if isinstance(s, dict) and s.get("role") != "base":
            fused.append({"name": s.get("name"), "strength": s.get("strength"), "preset": s.get("preset")})
    steps = record.get("lightning_steps")
    sampler = record.get("sampler")
    return Provenance(
        operation=record.get("operation") if isinstance(record.get("operation"), str) else None,
        fused=tuple(fused),
        lightning_steps=steps if isinstance(steps, int) and not isinstance(steps, bool) else None,
        sampler=sampler if isinstance(sampler, dict) else None,
        record=record,
        preset=fused_preset(metadata),
    )


def inspect_folder(root: Path, with_hash: bool | None) -> InspectReport:
    """The report of a diffusers pipeline folder (weights found by the one discovery rule)."""
    index = read_json(root / "model_index.json")
    scheduler: dict[str, Any] = {}
    if (root / "scheduler").is_dir():
        scheduler = read_json(root / "scheduler" / "scheduler_config.json")
    components: dict[str, tuple[tuple[str, ...], list[TensorEntry]]] = {}
    all_entries: list[TensorEntry] = []
    metadata: dict[str, str] = {}
    size = 0
    unet_shapes: dict[str, tuple[int, ...]] = {}
    for comp, spec in COMPONENTS.items():
        folder = spec.diffusers_folder
        files = component_weight_files(root, comp, allow_bin=True)
        if not files:
            continue
        comp_entries: list[TensorEntry] = []
        for f in files:
            size += f.stat().st_size
            src = open_source(f)
            try:
                for k in src.keys():
                    e = tensor_entry(src, k)
                    comp_entries.append(e)
                    all_entries.append(TensorEntry(f"{folder}/{k}", e.dtype, e.shape))
                if src.metadata and (comp == "unet" or not metadata):
                    metadata = dict(src.metadata)
            finally:
                src.close()
        if comp == "unet":
            unet_shapes = {e.key: e.shape for e in comp_entries}
        components[comp] = (tuple(f"{folder}/{f.name}" for f in files), comp_entries)
    if not components:
        raise InvalidFileError(f"'{root}' has model_index.json but no weight files in unet/, vae/, text_encoder/ "
                               f"or text_encoder_2/.")
    kind = detect_checkpoint(unet_shapes) if unet_shapes else CheckpointKind("unknown", "unknown", ())
    kind = CheckpointKind(kind.layout, kind.architecture, tuple(components), kind.prediction, kind.markers)  # type: ignore[arg-type]
    pipeline = index.get("_class_name") if isinstance(index.get("_class_name"), str) else None
    prediction = scheduler.get("prediction_type") if isinstance(scheduler.get("prediction_type"), str) else None
    info = FolderInfo(pipeline, prediction, components)
    file = FileSummary(str(root), root.name, "diffusers-folder", size, None, None)
    if with_hash:
        logger.info("not hashing '%s': a folder has no single sha256", root)
    ckpt = checkpoint_summary(root.name, None, kind, all_entries, metadata, info)
    return InspectReport("checkpoint", file, len(all_entries), numel_sum(all_entries),
                         count(e.dtype for e in all_entries), summarise_metadata(metadata), None, ckpt,
                         tuple(all_entries))
