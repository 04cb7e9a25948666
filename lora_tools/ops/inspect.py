"""Say what a LoRA or SDXL checkpoint holds, from its header alone.

:func:`inspect_path` reads safetensors headers (and the one-number ``alpha`` tensors of a LoRA)
with plain file I/O: inspecting a ``.safetensors`` file or a diffusers folder never imports torch.
A legacy ``.ckpt``/``.pt``/``.bin`` file is opened only through
:func:`lora_tools.sources.open_source` (``torch.load(weights_only=True)``); a pickle that needs
code execution is refused, never run.

JSON form (:meth:`InspectReport.to_dict`, ``loratool inspect --json``), ``schema`` 1. Every field
is always present; ``null`` where it does not apply.

- ``schema``: ``1``.
- ``kind``: ``"lora"`` or ``"checkpoint"``.
- ``file``: ``path``, ``name``, ``container`` (``safetensors``, ``pickle``, ``diffusers-folder``),
  ``size_bytes``, ``sha256`` and ``autov2`` (A1111/Civitai short hash); the hashes are ``null``
  when not computed (files of 2 GiB and more unless asked, folders).
- ``tensors``: number of tensors; ``parameters``: number of values (for a LoRA, the ``alpha``
  scalars are not counted); ``dtypes``: safetensors dtype name -> number of tensors.
- ``metadata``: ``kohya`` (the main ``ss_*`` keys: ``ss_network_module``, ``ss_network_dim``,
  ``ss_network_alpha``, ``ss_base_model_version``, ``ss_output_name``, ``ss_training_comment``...),
  ``kohya_other_keys`` (names of the remaining ``ss_*`` keys), ``modelspec`` (every
  ``modelspec.*`` key), ``other`` (every other key). Values longer than 200 characters are
  shortened (``... (N chars)``). The ``loratool`` record is reported under ``checkpoint.provenance``.
- ``lora`` (``null`` for checkpoints):

  - ``format``: the :func:`~lora_tools.lora.formats.detect_format` name (``kohya``, ``peft``,
    ``peft-raw``, ``diffusers-legacy``, ``comfy``); ``format_description``.
  - ``layout``: the SDXL layout the module shapes fit: ``sdxl`` (full size) or ``sdxl-tiny``
    (lora_tools' synthetic test model).
  - ``modules``: number of adapted modules; ``modules_per_component``: ``unet``/``te1``/``te2`` ->
    count; ``modules_per_block``: component -> block (SGM name, e.g. ``input_blocks.4``,
    ``middle_block``, ``text_model.encoder.layers.0``) -> count, matched modules only.
  - ``unet_naming``: ``sgm``, ``diffusers``, ``mixed``, ``text-encoder`` (no UNet module) or ``none``.
  - ``algorithms``: ``lora``, ``lora-tucker``, ``loha``, ``lokr``, ``dora``, ``full`` -> count.
  - ``ranks``: rank (as a string) -> count (``"0"``: no rank, e.g. full diffs).
  - ``alphas``: alpha (``"8"``, ``"0.5"``) or ``"none"`` (absent: alpha = rank) -> count.
  - ``scales``: effective ``alpha / rank`` -> count (``1`` where alpha is absent).
  - ``unmatched``: ``count``, ``first`` (up to 5 ``component:module`` names) and ``hint``
    (e.g. the SD1.x/SD2.x hint) or ``null``.
  - ``acceleration``: ``null``, or ``label`` (``"Lightning 4-step"``, ``"lightning/lcm/dmd2-shaped"``),
    ``family``, ``preset`` (``"lightning-4step"``), ``steps`` (``null``: unknown, the keys are the
    same for every step count), ``identified_by`` (``sha256``, ``filename``, ``metadata`` or
    ``keys``), ``key_signature`` (the file has the Lightning/LCM/DMD2 key signature),
    ``sampler`` (the preset's settings, see :class:`~lora_tools.presets.SamplerSettings`) and
    ``sampler_summary`` (one line), ``note``.
  - ``applies_to``: one sentence built from the facts above.

- ``checkpoint`` (``null`` for LoRAs):

  - ``layout``: ``sgm`` (single file), ``diffusers-unet`` (a bare diffusers UNet file),
    ``diffusers-folder`` (a pipeline folder with ``model_index.json``) or ``unknown``;
    ``pipeline``: the folder's ``_class_name``.
  - ``architecture`` (``sdxl-base``, ``sdxl-inpaint``, ``sdxl-refiner``, ``sd1.x``, ``sd2.x``,
    ``unknown``), ``supported`` (bool), ``why_unsupported`` (text or ``null``).
  - ``components``: ``unet``/``te1``/``te2``/``vae`` -> ``tensors``, ``parameters``, ``dtypes``,
    ``files`` (folder files holding it, else ``[]``).
  - ``prediction`` (``epsilon``, ``v_prediction``, ``edm``...), ``prediction_source``
    (``default``, ``markers``, ``scheduler_config``), ``markers`` (marker keys found),
    ``extra_keys`` (keys outside every component: markers, scheduler buffers...).
  - ``acceleration``: as for LoRAs (file name, sha256 or provenance), or ``null``.
  - ``provenance``: ``null``, or the ``loratool`` record lora_tools writes into fused files:
    ``operation``, ``fused`` (``name``, ``strength``, ``preset`` of each non-base source),
    ``lightning_steps``, ``sampler``, ``record`` (the whole record).
  - ``warnings``: things to know before fusing into or sampling with the model.

- ``keys`` (only with ``include_keys=True`` / ``--keys``): ``key``, ``dtype``, ``shape`` of every
  tensor, in file order (folder keys are prefixed with their subfolder, ``unet/...``).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

from lora_tools.errors import InvalidFileError, ShapeMismatchError, UnsupportedModelError
from lora_tools.layouts.detect import CheckpointKind, detect_checkpoint
from lora_tools.layouts.sdxl import FULL, TINY, SDXLConfig
from lora_tools.layouts.table import DIFFUSERS_FOLDERS, SGM_PREFIXES
from lora_tools.layouts.targets import TargetIndex
from lora_tools.lora.formats import format_description, load_lora
from lora_tools.lora.model import AdapterModule, LoraAdapter
from lora_tools.lora.resolve import _SD1_HINT, LoraMatch, match_lora
from lora_tools.presets import LIGHTNING, AccelerationPreset, SamplerSettings, identify_file
from lora_tools.provenance import read_provenance
from lora_tools.sources import SafetensorsSource, StateDictSource, open_source

logger = logging.getLogger(__name__)

__all__ = [
    "Acceleration",
    "CheckpointSummary",
    "ComponentSummary",
    "FileSummary",
    "InspectReport",
    "LoraSummary",
    "MetadataSummary",
    "Provenance",
    "TensorEntry",
    "UnmatchedSummary",
    "inspect_path",
]

#: Files at least this big are hashed only when asked (``with_hash=True``).
HASH_LIMIT_BYTES = 2 << 30
#: JSON schema version of :meth:`InspectReport.to_dict`.
SCHEMA_VERSION = 1
#: The LCM-LoRA SDXL training script's default targets (domain.md 1.2); the same list as
#: ``lora_tools.testing.synthetic_lora.LCM_TARGETS``, repeated here because that module imports torch.
LIGHTNING_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                     "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
LIGHTNING_SHAPED = "lightning/lcm/dmd2-shaped"
#: kohya ``ss_*`` keys shown with their value; the others are listed by name.
KOHYA_KEYS = (
    "ss_output_name", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
    "ss_base_model_version", "ss_sd_model_name", "ss_v2", "ss_training_comment", "ss_resolution",
    "ss_num_epochs", "ss_max_train_steps", "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr",
    "ss_optimizer", "ss_mixed_precision", "ss_training_started_at", "ss_training_finished_at",
)
_MAX_VALUE_CHARS = 200
_LAYOUTS: tuple[tuple[str, SDXLConfig], ...] = (("sdxl", FULL), ("sdxl-tiny", TINY))
_COMPONENT_NAMES = {"unet": "UNet", "te1": "CLIP-L text encoder", "te2": "OpenCLIP-bigG text encoder", "vae": "VAE"}
_STEPS_IN_TEXT = re.compile(r"lightning\D{0,20}?(\d+)[\s_-]*steps?", re.IGNORECASE)
_STEPS_METADATA_KEYS = ("ss_output_name", "modelspec.title", "modelspec.description", "ss_training_comment", "name", "title")

Kind = Literal["lora", "checkpoint"]
Container = Literal["safetensors", "pickle", "diffusers-folder"]


# ----------------------------------------------------------------------------- report types


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor of the file: key, safetensors dtype name and shape."""

    key: str
    dtype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True, slots=True)
class FileSummary:
    """The file (or folder) itself: name, container, size and hashes (``None`` when not computed)."""

    path: str
    name: str
    container: Container
    size_bytes: int
    sha256: str | None
    autov2: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "name": self.name, "container": self.container, "size_bytes": self.size_bytes,
                "sha256": self.sha256, "autov2": self.autov2}


@dataclass(frozen=True, slots=True)
class MetadataSummary:
    """``__metadata__`` grouped: kohya ``ss_*`` (main keys with values), ``modelspec.*``, the rest."""

    kohya: dict[str, str] = field(default_factory=dict)
    kohya_other_keys: tuple[str, ...] = ()
    modelspec: dict[str, str] = field(default_factory=dict)
    other: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kohya": dict(self.kohya), "kohya_other_keys": list(self.kohya_other_keys),
                "modelspec": dict(self.modelspec), "other": dict(self.other)}


@dataclass(frozen=True, slots=True)
class UnmatchedSummary:
    """LoRA modules that have no target in the chosen SDXL layout."""

    count: int
    first: tuple[str, ...]
    hint: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "first": list(self.first), "hint": self.hint}


@dataclass(frozen=True, slots=True)
class Acceleration:
    """What is known about an acceleration model (Lightning...) and how it was recognised.

    Attributes:
        label: ``"Lightning 4-step"`` or ``"lightning/lcm/dmd2-shaped"``.
        family: ``"lightning"`` when identified, ``None`` when only the key signature matches.
        preset: preset name (``"lightning-4step"``) or ``None``.
        steps: the step count, or ``None`` when unknown (keys alone never tell it).
        identified_by: ``sha256``, ``filename``, ``metadata`` or ``keys``.
        key_signature: the LoRA has the Lightning/LCM/DMD2 key signature (domain.md 1.6).
        sampler: the preset's sampler settings as a dict, or ``None``.
        sampler_summary: the same on one line, or ``None``.
        note: one sentence for people.
    """

    label: str
    family: str | None
    preset: str | None
    steps: int | None
    identified_by: str
    key_signature: bool
    sampler: dict[str, Any] | None
    sampler_summary: str | None
    note: str

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "family": self.family, "preset": self.preset, "steps": self.steps,
                "identified_by": self.identified_by, "key_signature": self.key_signature,
                "sampler": dict(self.sampler) if self.sampler is not None else None,
                "sampler_summary": self.sampler_summary, "note": self.note}


@dataclass(frozen=True, slots=True)
class LoraSummary:
    """What a LoRA adapts and how (see the module docstring for each field)."""

    format: str
    format_description: str
    layout: str
    modules: int
    modules_per_component: dict[str, int]
    modules_per_block: dict[str, dict[str, int]]
    unet_naming: str
    algorithms: dict[str, int]
    ranks: dict[int, int]
    alphas: dict[str, int]
    scales: dict[str, int]
    unmatched: UnmatchedSummary
    acceleration: Acceleration | None
    applies_to: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format, "format_description": self.format_description, "layout": self.layout,
            "modules": self.modules, "modules_per_component": dict(self.modules_per_component),
            "modules_per_block": {c: dict(b) for c, b in self.modules_per_block.items()},
            "unet_naming": self.unet_naming, "algorithms": dict(self.algorithms),
            "ranks": {str(r): n for r, n in self.ranks.items()}, "alphas": dict(self.alphas),
            "scales": dict(self.scales), "unmatched": self.unmatched.to_dict(),
            "acceleration": self.acceleration.to_dict() if self.acceleration else None,
            "applies_to": self.applies_to,
        }


@dataclass(frozen=True, slots=True)
class ComponentSummary:
    """One model component: tensor and parameter counts, dtypes, and the files holding it."""

    tensors: int
    parameters: int
    dtypes: dict[str, int]
    files: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"tensors": self.tensors, "parameters": self.parameters, "dtypes": dict(self.dtypes),
                "files": list(self.files)}


@dataclass(frozen=True, slots=True)
class Provenance:
    """The ``loratool`` record a fused file carries (see :mod:`lora_tools.provenance`)."""

    operation: str | None
    fused: tuple[dict[str, Any], ...]
    lightning_steps: int | None
    sampler: dict[str, Any] | None
    record: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"operation": self.operation, "fused": [dict(f) for f in self.fused],
                "lightning_steps": self.lightning_steps, "sampler": self.sampler, "record": self.record}


@dataclass(frozen=True, slots=True)
class CheckpointSummary:
    """What a checkpoint is (see the module docstring for each field)."""

    layout: str
    architecture: str
    supported: bool
    why_unsupported: str | None
    pipeline: str | None
    components: dict[str, ComponentSummary]
    prediction: str
    prediction_source: str
    markers: tuple[str, ...]
    extra_keys: tuple[str, ...]
    acceleration: Acceleration | None
    provenance: Provenance | None
    warnings: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": self.layout, "architecture": self.architecture, "supported": self.supported,
            "why_unsupported": self.why_unsupported, "pipeline": self.pipeline,
            "components": {c: s.to_dict() for c, s in self.components.items()},
            "prediction": self.prediction, "prediction_source": self.prediction_source,
            "markers": list(self.markers), "extra_keys": list(self.extra_keys),
            "acceleration": self.acceleration.to_dict() if self.acceleration else None,
            "provenance": self.provenance.to_dict() if self.provenance else None,
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True, slots=True)
class InspectReport:
    """Everything ``loratool inspect`` says about one file or folder.

    Exactly one of :attr:`lora` and :attr:`checkpoint` is set, matching :attr:`kind`.
    """

    kind: Kind
    file: FileSummary
    tensors: int
    parameters: int
    dtypes: dict[str, int]
    metadata: MetadataSummary
    lora: LoraSummary | None
    checkpoint: CheckpointSummary | None
    keys: tuple[TensorEntry, ...] = ()

    def to_dict(self, *, include_keys: bool = False) -> dict[str, Any]:
        """The stable JSON form (documented in this module's docstring)."""
        out: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "kind": self.kind,
            "file": self.file.to_dict(),
            "tensors": self.tensors,
            "parameters": self.parameters,
            "dtypes": dict(self.dtypes),
            "metadata": self.metadata.to_dict(),
            "lora": self.lora.to_dict() if self.lora else None,
            "checkpoint": self.checkpoint.to_dict() if self.checkpoint else None,
        }
        if include_keys:
            out["keys"] = [k.to_dict() for k in self.keys]
        return out


# ----------------------------------------------------------------------------- entry point


def inspect_path(path: str | Path, *, with_hash: bool | None = None) -> InspectReport:
    """Describe a LoRA file, a checkpoint file or a diffusers pipeline folder from its headers.

    Args:
        path (`str` or `Path`): a ``.safetensors`` file, a legacy ``.ckpt``/``.pt``/``.bin`` file
            (read with ``torch.load(weights_only=True)`` only), or a diffusers folder holding
            ``model_index.json``.
        with_hash (`bool`, *optional*): compute sha256 and AutoV2. Defaults to ``None``: hash files
            under 2 GiB (LoRAs), skip bigger ones and folders.

    Returns:
        `InspectReport`: the facts; :meth:`InspectReport.to_dict` gives the JSON form.

    Raises:
        [`InvalidFileError`]: missing, empty, truncated, corrupt or not a safetensors file; a
            directory that is not a diffusers folder.
        [`UnknownFormatError`]: the keys follow no LoRA or checkpoint scheme lora_tools knows.
        [`UnsupportedModelError`]: a LoRA that fits no SDXL model (e.g. an SD1.5 LoRA).
        [`ShapeMismatchError`]: a LoRA whose modules resolve by name but not by shape.
        [`UnsafeFileError`]: a pickle that would need code execution to load.

    Example:
        ```py
        >>> report = inspect_path("sdxl_lightning_4step_lora.safetensors")
        >>> report.lora.acceleration.label, report.lora.modules
        ('Lightning 4-step', 788)
        ```
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise InvalidFileError(
                f"'{path}' is a directory without model_index.json: pass a .safetensors file, a .ckpt file "
                f"or a diffusers pipeline folder."
            )
        return _inspect_folder(path, with_hash)
    src = open_source(path)
    try:
        return _inspect_file(path, src, with_hash)
    finally:
        src.close()


def _inspect_file(path: Path, src: SafetensorsSource | StateDictSource, with_hash: bool | None) -> InspectReport:
    keys = src.keys()
    entries = tuple(TensorEntry(k, *_meta(src, k)) for k in keys)
    shapes = {e.key: e.shape for e in entries}
    kind = detect_checkpoint(shapes)
    container: Container = "safetensors" if isinstance(src, SafetensorsSource) else "pickle"
    file = _file_summary(path, container, with_hash)
    metadata = _summarise_metadata(src.metadata)
    dtypes = _count(e.dtype for e in entries)
    if kind.layout != "unknown" or kind.components:
        ckpt = _checkpoint_summary(path.name, file.sha256, kind, entries, src.metadata, None)
        return InspectReport("checkpoint", file, len(entries), _numel_sum(entries), dtypes, metadata, None, ckpt, entries)
    adapter = load_lora(path, source=src)
    lora, parameters = _lora_summary(path, adapter, file.sha256, {e.key: e for e in entries})
    return InspectReport("lora", file, len(entries), parameters, dtypes, metadata, lora, None, entries)


def _meta(src: SafetensorsSource | StateDictSource, key: str) -> tuple[str, tuple[int, ...]]:
    m = src.meta(key)
    return m.dtype, tuple(m.shape)


# ----------------------------------------------------------------------------- LoRAs


def _lora_summary(path: Path, adapter: LoraAdapter, sha256: str | None,
                  entries: Mapping[str, TensorEntry]) -> tuple[LoraSummary, int]:
    layout, cfg, match = _choose_layout(path, adapter)
    modules = adapter.modules
    per_component = {c: 0 for c in ("unet", "te1", "te2")}
    for m in modules:
        per_component[m.component] = per_component.get(m.component, 0) + 1
    per_block: dict[str, dict[str, int]] = {}
    for mm in match.matched:
        blocks = per_block.setdefault(mm.module.component, {})
        blocks[mm.target.block] = blocks.get(mm.target.block, 0) + 1
    per_block = {c: dict(sorted(b.items(), key=lambda kv: _natural(kv[0]))) for c, b in per_block.items()}
    ranks = dict(sorted(Counter(m.rank for m in modules).items()))
    alphas = _count(_fmt_num(m.alpha) if m.alpha is not None else "none" for m in modules)
    scales = _count(_fmt_num(_scale(m)) for m in modules)
    unmatched = _unmatched_summary(match)
    signature = _lightning_signature(adapter, match, cfg)
    accel = _acceleration(path.name, sha256, adapter.metadata, signature)
    parameters = sum(math.prod(entries[k].shape) for m in modules for k in m.keys.values())
    summary = LoraSummary(
        format=adapter.format,
        format_description=format_description(adapter.format),
        layout=layout,
        modules=len(modules),
        modules_per_component=per_component,
        modules_per_block=per_block,
        unet_naming=match.naming,
        algorithms=_count(_algorithm(m) for m in modules),
        ranks=ranks,
        alphas=dict(sorted(alphas.items(), key=lambda kv: -kv[1])),
        scales=dict(sorted(scales.items(), key=lambda kv: -kv[1])),
        unmatched=unmatched,
        acceleration=accel,
        applies_to=_applies_to(layout, per_component, unmatched, accel),
    )
    return summary, parameters


def _choose_layout(path: Path, adapter: LoraAdapter) -> tuple[str, SDXLConfig, LoraMatch]:
    """Match against full SDXL, then the tiny test layout; keep the one whose shapes fit best."""
    best: tuple[str, SDXLConfig, LoraMatch] | None = None
    first_error: Exception | None = None
    for name, cfg in _LAYOUTS:
        try:
            match = match_lora(adapter, TargetIndex(cfg.table), base=f"SDXL ({name})")
            _check_lycoris_shapes(adapter, match, name)
        except ShapeMismatchError as e:
            first_error = first_error or e
            continue
        if best is None or len(match.matched) > len(best[2].matched):
            best = (name, cfg, match)
    if best is None:
        assert first_error is not None
        raise first_error
    if not best[2].matched:
        match = best[2]
        names = ", ".join(f"{m.component}:{m.name}" for m in match.unmatched[:3])
        hint = _sd1_hint(match)
        raise UnsupportedModelError(
            f"'{path}' is a {adapter.format} LoRA that fits no SDXL model: none of its {len(adapter.modules)} "
            f"modules has an SDXL target (first: {names}).{' ' + hint if hint else ''}"
        )
    return best


def _check_lycoris_shapes(adapter: LoraAdapter, match: LoraMatch, layout: str) -> None:
    """LoHa/LoKr shapes, which :func:`match_lora` leaves to delta time."""
    src = adapter.source
    for mm in match.matched:
        m = mm.module
        dims = _lycoris_dims(src, m)
        if dims is None:
            continue
        want = mm.target.shape
        if dims != (want[0], math.prod(want[1:])):
            raise ShapeMismatchError(
                f"'{adapter.path}': {m.kind} module '{m.name}' gives {dims[0]}x{dims[1]}, "
                f"'{mm.target.sgm_key}' of SDXL ({layout}) is {list(want)}."
            )


def _lycoris_dims(src: SafetensorsSource | StateDictSource, m: AdapterModule) -> tuple[int, int] | None:
    """``(out, fan_in)`` of a LoHa/LoKr delta from factor shapes, or ``None`` when not checked."""
    def shape(role: str) -> tuple[int, ...]:
        return tuple(src.meta(m.keys[role]).shape)

    if m.kind == "loha" and "t1" not in m.keys and "t2" not in m.keys:
        return shape("w1a")[0], math.prod(shape("w1b")[1:])
    if m.kind == "lokr" and "t2" not in m.keys:
        o1, i1 = (shape("w1")[0], math.prod(shape("w1")[1:])) if "w1" in m.keys else (shape("w1a")[0], shape("w1b")[1])
        if "w2" in m.keys:
            o2, i2 = shape("w2")[0], math.prod(shape("w2")[1:])
        else:
            o2, i2 = shape("w2a")[0], math.prod(shape("w2b")[1:])
        return o1 * o2, i1 * i2
    return None


def _sd1_hint(match: LoraMatch) -> str | None:
    if any(_SD1_HINT.search(m.name) for m in match.unmatched):
        return "It looks like an SD1.x/SD2.x LoRA, which does not fit SDXL."
    return None


def _unmatched_summary(match: LoraMatch) -> UnmatchedSummary:
    first = tuple(f"{m.component}:{m.name}" for m in match.unmatched[:5])
    return UnmatchedSummary(len(match.unmatched), first, _sd1_hint(match) if match.unmatched else None)


def _scale(m: AdapterModule) -> float:
    return m.scale  # the fuse's own rule (alpha = 0 or absent: 1)


def _algorithm(m: AdapterModule) -> str:
    if m.kind == "lora" and m.is_dora:
        return "dora"
    return m.algorithm


def _lightning_signature(adapter: LoraAdapter, match: LoraMatch, cfg: SDXLConfig) -> bool:
    """domain.md 1.6: kohya keys, UNet only, diffusers names, exactly the LCM target set,
    one rank, alpha on every module.
    """
    modules = adapter.modules
    if adapter.format not in ("kohya", "kohya-diffusers") or not modules or match.unmatched:
        return False
    if any(m.component != "unet" or m.kind != "lora" or m.alpha is None or m.is_dora or "mid" in m.keys
           for m in modules):
        return False
    if match.naming != "diffusers":
        return False
    if len({m.rank for m in modules}) != 1:
        return False
    want = {t.diffusers_module for t in TargetIndex(cfg.table).targets
            if t.component == "unet" and t.diffusers_module.endswith(LIGHTNING_TARGETS)}
    have = [mm.target.diffusers_module for mm in match.matched]
    return len(have) == len(want) and set(have) == want


def _acceleration(name: str, sha256: str | None, metadata: Mapping[str, str], signature: bool,
                  provenance_steps: int | None = None) -> Acceleration | None:
    preset = identify_file(name, sha256)
    how = None
    if preset is not None:
        how = "sha256" if sha256 and sha256.lower() in preset.known_sha256.values() else "filename"
    else:
        steps = provenance_steps or _steps_from_metadata(metadata)
        if steps in LIGHTNING:
            preset, how = LIGHTNING[steps], "metadata"  # type: ignore[index]
    if preset is not None and how is not None:
        by = {"sha256": "its sha256", "filename": "its file name", "metadata": "its metadata"}[how]
        note = f"Identified as SDXL-Lightning {preset.steps}-step by {by}."
        if signature:
            note += " Its keys match the Lightning/LCM/DMD2 signature."
        elif how == "filename":
            note += " Its keys do not have the Lightning LoRA signature, so the name may be misleading."
        return _preset_acceleration(preset, how, signature, note)
    if signature:
        return Acceleration(
            LIGHTNING_SHAPED, None, None, None, "keys", True, None, None,
            "Keys match SDXL-Lightning, LCM-LoRA and DMD2 (kohya keys, UNet only, diffusers names, the "
            "LCM target set, one rank, alpha everywhere). The step count cannot be read from keys: check "
            "the file name or the model card.",
        )
    return None


def _preset_acceleration(preset: AccelerationPreset, how: str, signature: bool, note: str) -> Acceleration:
    sampler: SamplerSettings = preset.sampler
    return Acceleration(f"Lightning {preset.steps}-step", preset.family, preset.name, preset.steps, how,
                        signature, sampler.to_dict(), sampler.describe(), note)


def _steps_from_metadata(metadata: Mapping[str, str]) -> int | None:
    for key in _STEPS_METADATA_KEYS:
        m = _STEPS_IN_TEXT.search(metadata.get(key, ""))
        if m:
            return int(m.group(1))
    return None


def _applies_to(layout: str, per_component: Mapping[str, int], unmatched: UnmatchedSummary,
                accel: Acceleration | None) -> str:
    model = ("SDXL 1.0 base and checkpoints derived from it" if layout == "sdxl"
             else "the tiny SDXL-topology test model of lora_tools")
    changed = [c for c in ("unet", "te1", "te2") if per_component.get(c)]
    untouched = [c for c in ("unet", "te1", "te2") if not per_component.get(c)]
    text = f"{model} ({', '.join(_COMPONENT_NAMES[c] for c in changed)})"
    if untouched == ["te1", "te2"]:
        text += "; text encoders untouched"
    elif untouched:
        text += "; " + " and ".join(_COMPONENT_NAMES[c] for c in untouched) + " untouched"
    if accel is not None:
        text += "; eps-prediction models only (v-prediction/EDM checkpoints will likely misbehave)"
    if unmatched.count:
        text += f"; {unmatched.count} module(s) have no SDXL target"
    return text


# ----------------------------------------------------------------------------- checkpoints


def _checkpoint_summary(name: str, sha256: str | None, kind: CheckpointKind, entries: Iterable[TensorEntry],
                        metadata: Mapping[str, str], folder: _FolderInfo | None) -> CheckpointSummary:
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
    prediction, source = kind.prediction, "markers" if kind.markers else "default"
    if folder is not None and folder.prediction_type:
        prediction, source = folder.prediction_type, "scheduler_config"
    provenance = _provenance(metadata)
    accel = _acceleration(name, sha256, metadata, False, provenance.lightning_steps if provenance else None)
    warnings = []
    if not kind.supported:
        warnings.append(f"lora_tools cannot fuse into this model: {kind.why_unsupported()}.")
    if prediction not in ("epsilon", "sample"):
        warnings.append(f"The model predicts {prediction}; SDXL-Lightning was distilled for eps-prediction SDXL "
                        f"and will likely misbehave on it.")
    if provenance and provenance.lightning_steps:
        warnings.append(f"SDXL-Lightning ({provenance.lightning_steps}-step) is already fused into this file.")
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
    return ComponentSummary(len(entries), _numel_sum(entries), _count(e.dtype for e in entries), files)


def _provenance(metadata: Mapping[str, str]) -> Provenance | None:
    record = read_provenance(metadata)
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
    )


@dataclass
class _FolderInfo:
    pipeline: str | None
    prediction_type: str | None
    components: dict[str, tuple[tuple[str, ...], list[TensorEntry]]]


def _inspect_folder(root: Path, with_hash: bool | None) -> InspectReport:
    index = _read_json(root / "model_index.json")
    scheduler = _read_json(root / "scheduler" / "scheduler_config.json") if (root / "scheduler").is_dir() else {}
    components: dict[str, tuple[tuple[str, ...], list[TensorEntry]]] = {}
    all_entries: list[TensorEntry] = []
    metadata: dict[str, str] = {}
    size = 0
    unet_shapes: dict[str, tuple[int, ...]] = {}
    for comp, folder in DIFFUSERS_FOLDERS.items():
        files = _weight_files(root / folder)
        if not files:
            continue
        comp_entries: list[TensorEntry] = []
        for f in files:
            size += f.stat().st_size
            src = open_source(f)
            try:
                for k in src.keys():
                    e = TensorEntry(k, *_meta(src, k))
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
    info = _FolderInfo(pipeline, prediction, components)
    file = FileSummary(str(root), root.name, "diffusers-folder", size, None, None)
    if with_hash:
        logger.info("not hashing '%s': a folder has no single sha256", root)
    ckpt = _checkpoint_summary(root.name, None, kind, all_entries, metadata, info)
    return InspectReport("checkpoint", file, len(all_entries), _numel_sum(all_entries),
                         _count(e.dtype for e in all_entries), _summarise_metadata(metadata), None, ckpt,
                         tuple(all_entries))


def _weight_files(folder: Path) -> list[Path]:
    """The weight files of one component folder: no variant preferred, shards kept together."""
    if not folder.is_dir():
        return []
    for suffix in (".safetensors", ".bin"):
        groups: dict[str, list[Path]] = {}
        for f in sorted(folder.glob(f"*{suffix}")):
            stem = f.name[: -len(suffix)]
            for base in ("diffusion_pytorch_model", "model"):
                if stem == base or stem.startswith((base + ".", base + "-")):
                    rest = stem[len(base):]
                    variant = rest.split("-", 1)[0].lstrip(".")
                    groups.setdefault(variant, []).append(f)
                    break
        if groups:
            return groups.get("") or groups[sorted(groups)[0]]
    return []


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InvalidFileError(f"'{path}' is not readable JSON ({e}).") from e
    if not isinstance(data, dict):
        raise InvalidFileError(f"'{path}' is not a JSON object.")
    return data


# ----------------------------------------------------------------------------- shared helpers


def _file_summary(path: Path, container: Container, with_hash: bool | None) -> FileSummary:
    size = path.stat().st_size
    sha = autov2 = None
    if with_hash or (with_hash is None and size < HASH_LIMIT_BYTES):
        from lora_tools.hub import autov2_hash, sha256_file  # huggingface_hub: import only when hashing

        sha = sha256_file(path)
        autov2 = autov2_hash(sha)
    return FileSummary(str(path), path.name, container, size, sha, autov2)


def _summarise_metadata(metadata: Mapping[str, str]) -> MetadataSummary:
    kohya = {k: _shorten(metadata[k]) for k in KOHYA_KEYS if k in metadata}
    kohya_other = tuple(sorted(k for k in metadata if k.startswith("ss_") and k not in kohya))
    modelspec = {k: _shorten(v) for k, v in sorted(metadata.items()) if k.startswith("modelspec.")}
    other = {k: _shorten(v) for k, v in sorted(metadata.items())
             if not k.startswith(("ss_", "modelspec.")) and k != "loratool"}
    return MetadataSummary(kohya, kohya_other, modelspec, other)


def _shorten(value: str) -> str:
    value = str(value)
    if len(value) <= _MAX_VALUE_CHARS:
        return value
    return f"{value[:_MAX_VALUE_CHARS]}... ({len(value)} chars)"


def _numel_sum(entries: Iterable[TensorEntry]) -> int:
    return sum(math.prod(e.shape) for e in entries)


def _count(items: Iterable[str]) -> dict[str, int]:
    return dict(Counter(items).most_common())


def _fmt_num(x: float) -> str:
    return f"{x:g}"


def _natural(s: str) -> list[object]:
    return [(0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", s) if t]


def component_label(component: str) -> str:
    """People's name of a component (``unet`` -> ``UNet``)."""
    return _COMPONENT_NAMES.get(component, component)
