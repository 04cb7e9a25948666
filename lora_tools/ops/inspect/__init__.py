"""Say what a LoRA or SDXL checkpoint holds, from its header alone.

:func:`inspect_path` reads safetensors headers (and the one-number ``alpha`` tensors of a LoRA)
with plain file I/O: inspecting a ``.safetensors`` file or a diffusers folder never imports torch.
A legacy ``.ckpt``/``.pt``/``.bin`` file is opened only through
:func:`lora_tools.io.sources.open_source` (``torch.load(weights_only=True)``); a pickle that needs
code execution is refused, never run.

The package: :mod:`.report` (types), :mod:`.lora` (LoRA analysis), :mod:`.checkpoint` (checkpoints
and folders), :mod:`.acceleration` (Lightning and friends).

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

  - ``format``: the :func:`~lora_tools.lora.load.detect_format` name (``kohya``,
    ``kohya-diffusers``, ``diffusers``, ``peft``, ``comfy``, ``diffusers-legacy``): the format
    ``save_lora`` writes back; ``format_description``.
  - ``layout``: the SDXL layout the module shapes fit: ``sdxl`` (full size) or ``sdxl-tiny``
    (lora_tools' synthetic test model).
  - ``modules``: number of adapted modules; ``modules_per_component``: ``unet``/``te1``/``te2`` ->
    count; ``modules_per_block``: component -> block (SGM name, e.g. ``input_blocks.4``,
    ``middle_block``, ``text_model.encoder.layers.0``) -> count, matched modules only;
    ``blocks``: block of :mod:`lora_tools.layouts.blocks` (``IN04``, ``M00``, ``TE1``) -> count of
    matched modules, in model order.
  - ``unet_naming``: ``sgm``, ``diffusers``, ``mixed``, ``text-encoder`` (no UNet module) or ``none``.
  - ``naming``: the naming family of the module names (``kohya``, ``kohya-diffusers``, ``diffusers``,
    ``peft``, ``comfy``; ``mixed``); ``spellings``: factor spelling (``kohya``: lora_up/lora_down,
    ``peft``: lora_A/lora_B, ``peft-default``, ``legacy-lora``, ``legacy-linear``, ``legacy-underscore``,
    ``legacy-processor``) -> number of modules. The two are independent: any spelling under any naming.
  - ``targets``: every module in file order: ``module`` (``component:name``), ``naming``, ``spelling``,
    ``algorithm``, ``target`` (single-file key of the weight it changes, ``null`` when none),
    ``bias`` (single-file key of the bias its ``.diff_b``/``.b_norm`` changes, or ``null``), ``rows``
    (``"2/3"``: the second of three row blocks, OpenCLIP-bigG's fused q/k/v), ``transposed`` (the
    single file stores the weight transposed: bigG's ``text_projection``), ``reason`` (why it has no
    target, or ``null``).
  - ``algorithms``: ``lora``, ``lora-tucker``, ``loha``, ``lokr``, ``dora``, ``full`` -> count.
  - ``ranks``: rank (as a string) -> count (``"0"``: no rank, e.g. full diffs).
  - ``alphas``: alpha (``"8"``, ``"0.5"``) or ``"none"`` (absent: alpha = rank) -> count.
  - ``scales``: effective scale -> count, exactly the fuse's
    (:func:`lora_tools.lora.scale.module_scale`, used by the fuse: ``alpha / rank``; ``1`` where alpha is absent or 0).
  - ``unmatched``: ``count``, ``first`` (up to 5 ``component:module`` names) and ``hint``
    (e.g. the SD1.x/SD2.x hint) or ``null``.
  - ``acceleration``: ``null``, or ``label`` (``"Lightning 4-step"``, ``"lightning/lcm/dmd2-shaped"``),
    ``family``, ``preset`` (``"lightning-4step"``), ``steps`` (``null``: unknown, the keys are the
    same for every step count), ``identified_by`` (``sha256``, ``filename``, ``metadata`` or
    ``keys``), ``key_signature`` (the file has the Lightning/LCM/DMD2 key signature),
    ``sampler`` (the preset's settings, see :class:`~lora_tools.presets.SamplerSettings`) and
    ``sampler_summary`` (one line), ``note``.
  - ``applies_to``: one sentence built from the facts above.
  - ``loaders``: what each loader will take the LoRA for, one sentence each: ``a1111_forge`` (A1111/Forge's
    version rule on the metadata: SDXL, SD2, SD1 or Unknown, and the checkpoints it is listed with),
    ``comfyui`` and ``kohya`` (both load by keys).
  - ``mismatched``: modules whose names resolve to an SDXL weight their factors do not fit:
    ``module`` (``component:name``), ``target`` (single-file key), ``message``; ``[]`` when all fit.
    The CLI prints the report and exits with status 1 when this is not empty.
  - ``warnings``: things to know before fusing it (mis-shaped modules, a Lightning file name
    without the Lightning key signature).

- ``checkpoint`` (``null`` for LoRAs):

  - ``layout``: ``sgm`` (single file), ``diffusers-unet`` (a bare diffusers UNet file),
    ``diffusers-folder`` (a pipeline folder with ``model_index.json``) or ``unknown``;
    ``pipeline``: the folder's ``_class_name``.
  - ``architecture`` (``sdxl-base``, ``sdxl-inpaint``, ``sdxl-refiner``, ``sd1.x``, ``sd2.x``,
    ``unknown``), ``supported`` (bool), ``why_unsupported`` (text or ``null``).
  - ``components``: ``unet``/``te1``/``te2``/``vae`` -> ``tensors``, ``parameters``, ``dtypes``,
    ``files`` (folder files holding it, else ``[]``).
  - ``prediction`` (``epsilon``, ``v_prediction``, ``edm``, ``sample``...), ``prediction_source``
    (``default``, ``markers``, ``scheduler_config``, ``record``: the sampler of our own record), ``markers`` (marker keys found),
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

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from lora_tools.errors import InvalidFileError
from lora_tools.io.remote import as_path
from lora_tools.io.sources import SafetensorsSource, StateDictSource, open_source
from lora_tools.layouts.components import component_label
from lora_tools.layouts.detect import detect_checkpoint
from lora_tools.lora.load import load_lora
from lora_tools.ops.inspect._common import (
    HASH_LIMIT_BYTES,
    count,
    file_summary,
    numel_sum,
    summarise_metadata,
    tensor_entry,
)
from lora_tools.ops.inspect.checkpoint import checkpoint_summary, inspect_folder
from lora_tools.ops.inspect.lora import lora_summary
from lora_tools.ops.inspect.report import (
    SCHEMA_VERSION,
    Acceleration,
    CheckpointSummary,
    ComponentSummary,
    Container,
    FileSummary,
    InspectReport,
    LoraSummary,
    MetadataSummary,
    MismatchedModule,
    Provenance,
    TensorEntry,
    UnmatchedSummary,
)

__all__ = [
    "Acceleration",
    "CheckpointSummary",
    "ComponentSummary",
    "FileSummary",
    "HASH_LIMIT_BYTES",
    "InspectReport",
    "LoraSummary",
    "MetadataSummary",
    "MismatchedModule",
    "Provenance",
    "SCHEMA_VERSION",
    "TensorEntry",
    "UnmatchedSummary",
    "component_label",
    "inspect_path",
]


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
        [`ShapeMismatchError`]: a LoRA whose modules resolve by name but none fits by shape.
            When only some do not fit, the report lists them (``lora.mismatched``) instead.
        [`UnsafeFileError`]: a pickle that would need code execution to load.

    Example:
        ```py
        >>> report = inspect_path("sdxl_lightning_4step_lora.safetensors")
        >>> report.lora.acceleration.label, report.lora.modules
        ('Lightning 4-step', 788)
        ```
    """
    path = as_path(path)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise InvalidFileError(
                f"'{path}' is a directory without model_index.json: pass a .safetensors file, a .ckpt file "
                f"or a diffusers pipeline folder."
            )
        return inspect_folder(path, with_hash)
    src = open_source(path)
    try:
        return _inspect_file(path, src, with_hash)
    finally:
        src.close()


def _fp8_layout(src: SafetensorsSource | StateDictSource, entries: Sequence[TensorEntry]) -> str | None:
    """The fp8 layout of a checkpoint: plain or scaled, how many fp8 tensors, the range of scale_weight."""
    from lora_tools.io.fp8 import SCALE_SUFFIX, layout_of

    scales = {e.key: src.scalar(e.key) for e in entries if e.key.endswith("." + SCALE_SUFFIX)}
    layout = layout_of({e.key: e.dtype for e in entries}, scales)
    return layout.describe() if layout is not None else None


def _inspect_file(path: Path, src: SafetensorsSource | StateDictSource, with_hash: bool | None) -> InspectReport:
    keys = src.keys()
    entries = tuple(tensor_entry(src, k) for k in keys)
    shapes = {e.key: e.shape for e in entries}
    kind = detect_checkpoint(shapes)
    container: Container = "safetensors" if isinstance(src, SafetensorsSource) else "pickle"
    file = file_summary(path, container, with_hash)
    metadata = summarise_metadata(src.metadata)
    dtypes = count(e.dtype for e in entries)
    if kind.layout != "unknown" or kind.components:
        ckpt = checkpoint_summary(path.name, file.sha256, kind, entries, src.metadata, None)
        if any(e.dtype in ("F8_E4M3", "F8_E5M2") for e in entries):
            ckpt = replace(ckpt, fp8=_fp8_layout(src, entries))
        return InspectReport("checkpoint", file, len(entries), numel_sum(entries), dtypes, metadata, None, ckpt, entries)
    adapter = load_lora(path, source=src)
    lora, parameters = lora_summary(path, adapter, file.sha256, {e.key: e for e in entries})
    return InspectReport("lora", file, len(entries), parameters, dtypes, metadata, lora, None, entries)
