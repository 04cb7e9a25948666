"""The report types of ``loratool inspect``: frozen dataclasses, JSON through ``dataclasses.asdict``.

Field by field documentation of the JSON form is in :mod:`lora_tools.ops.inspect`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

#: JSON schema version of :meth:`InspectReport.to_dict`.
SCHEMA_VERSION = 1

Kind = Literal["lora", "checkpoint"]
Container = Literal["safetensors", "pickle", "diffusers-folder"]

__all__ = [
    "Acceleration", "CheckpointSummary", "ComponentSummary", "FileSummary", "InspectReport", "LoraSummary",
    "MetadataSummary", "MismatchedModule", "Provenance", "TensorEntry", "UnmatchedSummary", "SCHEMA_VERSION",
]


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor of the file: key, safetensors dtype name and shape."""

    key: str
    dtype: str
    shape: tuple[int, ...]



@dataclass(frozen=True, slots=True)
class FileSummary:
    """The file (or folder) itself: name, container, size and hashes (``None`` when not computed)."""

    path: str
    name: str
    container: Container
    size_bytes: int
    sha256: str | None
    autov2: str | None



@dataclass(frozen=True, slots=True)
class MetadataSummary:
    """``__metadata__`` grouped: kohya ``ss_*`` (main keys with values), ``modelspec.*``, the rest."""

    kohya: dict[str, str] = field(default_factory=dict)
    kohya_other_keys: tuple[str, ...] = ()
    modelspec: dict[str, str] = field(default_factory=dict)
    other: dict[str, str] = field(default_factory=dict)



@dataclass(frozen=True, slots=True)
class UnmatchedSummary:
    """LoRA modules that have no target in the chosen SDXL layout."""

    count: int
    first: tuple[str, ...]
    hint: str | None



@dataclass(frozen=True, slots=True)
class MismatchedModule:
    """A LoRA module whose name resolves to a base weight its factors do not fit.

    Attributes:
        module: ``component:name`` as the file spells it.
        target: the single-file key of the weight it resolves to.
        message: what does not fit (the shapes), one sentence.
    """

    module: str
    target: str
    message: str


@dataclass(frozen=True, slots=True)
class ModuleTarget:
    """One LoRA module, how its keys are spelled, and the base tensors it changes.

    Attributes:
        module: ``component:name`` as the file spells it.
        naming: its naming family (``kohya``, ``kohya-diffusers``, ``diffusers``, ``peft``, ``comfy``).
        spelling: its factor spelling (``kohya``: lora_up/lora_down, ``peft``: lora_A/lora_B,
            ``legacy-lora``, ``legacy-linear``, ``legacy-underscore``, ``legacy-processor``, ``peft-default``).
        algorithm: ``lora``, ``lora-tucker``, ``loha``, ``lokr``, ``full``, ``dora``...
        target: the single-file key of the weight it changes, or ``None`` (no target, or a bias diff only).
        bias: the single-file key of the bias its bias diff changes, or ``None``.
        rows: ``"i/n"``: it changes the i-th of n row blocks (OpenCLIP-bigG's fused q/k/v), else ``None``.
        transposed: the single file stores that weight transposed (bigG's ``text_projection``).
        reason: why it has no target, when SDXL's structure says so, else ``None``.
    """

    module: str
    naming: str
    spelling: str
    algorithm: str
    target: str | None
    bias: str | None = None
    rows: str | None = None
    transposed: bool = False
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Acceleration:
    """What is known about an acceleration model (Lightning...) and how it was recognised.

    Attributes:
        label: ``"Lightning 4-step"`` or ``"lightning/lcm/dmd2-shaped"``.
        family: ``"lightning"`` when identified, ``None`` when only the key signature matches.
        preset: preset name (``"lightning-4step"``) or ``None``.
        steps: the step count, or ``None`` when unknown (keys alone never tell it).
        identified_by: ``sha256``, ``filename``, ``metadata`` or ``keys``.
        key_signature: the LoRA has the Lightning/LCM/DMD2 key signature (kohya keys, UNet only, the LCM target set).
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
    blocks: dict[str, int] = field(default_factory=dict)
    mismatched: tuple[MismatchedModule, ...] = ()
    warnings: tuple[str, ...] = ()
    naming: str = ""
    spellings: dict[str, int] = field(default_factory=dict)
    targets: tuple[ModuleTarget, ...] = ()
    loaders: dict[str, str] = field(default_factory=dict)



@dataclass(frozen=True, slots=True)
class ComponentSummary:
    """One model component: tensor and parameter counts, dtypes, and the files holding it."""

    tensors: int
    parameters: int
    dtypes: dict[str, int]
    files: tuple[str, ...] = ()



@dataclass(frozen=True, slots=True)
class Provenance:
    """The ``loratool`` record a fused file carries (see :mod:`lora_tools.provenance`)."""

    operation: str | None
    fused: tuple[dict[str, Any], ...]
    lightning_steps: int | None
    sampler: dict[str, Any] | None
    record: dict[str, Any]
    preset: str | None = None



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
    fp8: str | None = None  # the fp8 layout (lora_tools.io.fp8.Fp8Layout.describe()), None without fp8 weights



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
        """The stable JSON form (documented in :mod:`lora_tools.ops.inspect`)."""
        out: dict[str, Any] = {"schema": SCHEMA_VERSION}
        out.update(to_jsonable(asdict(self)))
        keys = out.pop("keys")
        if include_keys:
            out["keys"] = keys
        return out


def to_jsonable(value: Any) -> Any:
    """``dataclasses.asdict`` output as JSON types: tuples become lists, mapping keys strings."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value
