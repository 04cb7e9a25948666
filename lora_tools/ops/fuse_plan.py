"""Plan a fuse: resolve every source, match every module, check everything, write nothing.

All errors happen here, before a single byte of output exists: unmatched modules, shapes,
architecture, non-finite LoRA factors, double application, outputs that already exist.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, TypeVar

from lora_tools.errors import Hint, KeyMismatchError, ShapeMismatchError, UnsupportedModelError, UsageError
from lora_tools.io import atomic
from lora_tools.io.fp8 import Fp8Form
from lora_tools.io.model import ModelSource, TensorRef, open_model
from lora_tools.io.remote import as_path, is_url
from lora_tools.io.safetensors import DTYPE_ALIASES, DTYPE_SIZES
from lora_tools.io.sources import SafetensorsSource
from lora_tools.layouts.targets import TargetIndex
from lora_tools.lora.adapter import LoraAdapter
from lora_tools.lora.load import load_lora
from lora_tools.lora.match import LoraMatch, MatchedModule, match_lora
from lora_tools.lora.validate import raise_factor_problems, raise_non_finite
from lora_tools.ops.baked import check_not_baked
from lora_tools.output import plan as output_plan
from lora_tools.presets import (
    SDXL_BASE_REPO,
    SDXL_BASE_UNET_FILE,
    AccelerationPreset,
    SamplerSettings,
    get_preset,
    identify_file,
    lightning_preset,
)
from lora_tools.presets.local import BASE_UNET_NAMES
from lora_tools.provenance import fused_preset

logger = logging.getLogger(__name__)
T = TypeVar("T")

SaveKind = Literal["checkpoint", "unet", "diffusers"]
Method = Literal["lora", "unet"]
SAVE_KINDS: tuple[SaveKind, ...] = ("checkpoint", "unet", "diffusers")
#: Resident memory of the interpreter with torch imported, before any tensor.
_RUNTIME_BYTES = 250 << 20
#: Strengths beyond this are typos, and overflow fp32 maths.
MAX_STRENGTH = 1000.0


@dataclass(frozen=True)
class LoraSource:
    """One LoRA to apply: where it came from and how strongly."""

    adapter: LoraAdapter
    match: LoraMatch
    strength: float
    label: str
    preset: AccelerationPreset | None = None
    max_abs: Mapping[str, float] = field(default_factory=dict)  # largest |value| of each factor (by key)

    @property
    def path(self) -> Path:
        """The LoRA's file: a fuse reads every LoRA it applies from one."""
        if self.adapter.path is None:
            raise ValueError(f"the LoRA '{self.label}' of a fuse has no file")
        return self.adapter.path


@dataclass(frozen=True)
class DiffSource:
    """An add-difference source: ``strength * (tuned - original)`` on every UNet tensor."""

    tuned: SafetensorsSource
    original: SafetensorsSource
    strength: float
    label: str
    preset: AccelerationPreset | None = None


@dataclass(frozen=True)
class OutputSpec:
    kind: SaveKind
    path: Path


@dataclass
class FusePlan:
    """Everything a fuse will do, decided before writing."""

    base: ModelSource
    loras: list[LoraSource]
    diffs: list[DiffSource]
    outputs: list[OutputSpec]
    out_dtype: str | None  # None = keep each tensor's dtype
    sampler: SamplerSettings | None
    preset: AccelerationPreset | None  # the acceleration preset baked in (given, or recognised among the LoRAs)
    method: Method
    patches: dict[str, list[tuple[LoraSource, MatchedModule]]]
    warnings: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    overwrite: bool = False
    hash_base: bool = False
    verify_output: bool = False
    hashes: dict[Path, Future[str]] = field(default_factory=dict)  # sha256 of LoRA files, computed while planning
    fp8: Fp8Form | None = None  # fp8 outputs (UNet linear weights, plain: conv too; lora_tools.io.fp8), else None
    hash_output: bool | None = None  # sha256 each output while writing it; None: outputs up to 2 GiB only

    @property
    def lightning_steps(self) -> int | None:
        """The SDXL-Lightning step count baked in, for old readers (``None`` for other presets)."""
        return self.preset.steps if self.preset is not None and self.preset.family == "lightning" else None

    def sha256_of(self, path: Path) -> str:
        from lora_tools.io.hashing import sha256_file

        future = self.hashes.get(path)
        if future is None:  # hashed once, whoever asks (the record's sources, its run entry)
            future = self.hashes[path] = Future()
            future.set_result(sha256_file(path))
        return future.result()

    def output_dtype(self, dtype: str) -> str:
        from lora_tools.io.safetensors import is_float_dtype

        if self.fp8 is not None:  # kept tensors keep their dtype; the fp8 sinks have theirs patched in fp32
            return dtype
        return self.out_dtype if self.out_dtype and is_float_dtype(dtype) else dtype

    def patched_keys(self) -> set[str]:
        keys = set(self.patches)
        if self.diffs:
            keys |= {r.key for r in self.base.refs if r.rows and r.rows[0].component == "unet"}
        return keys

    def modules_per_block(self) -> dict[tuple[str, str], int]:
        """Matched LoRA modules per block: ``(block-scheme name, component:SGM block)`` -> count,
        in model order (``("IN04", "unet:input_blocks.4")``; names from :mod:`lora_tools.layouts.blocks`)."""
        from lora_tools.layouts.blocks import BLOCKS, block_of

        c: Counter[tuple[str, str]] = Counter()
        for key, contributions in self.patches.items():
            for _, mm in contributions:
                if key != mm.keys[0]:  # a module listed under its weight and its bias counts once
                    continue
                t = mm.target
                c[(block_of(t.component, t.sgm_key), f"{t.component}:{t.block}")] += 1
        order = {b: i for i, b in enumerate(BLOCKS)}
        return dict(sorted(c.items(), key=lambda kv: (order.get(kv[0][0], len(order)), kv[0][1])))

    def _refs_written(self, kind: SaveKind) -> list[TensorRef]:
        """The base tensors an output of ``kind`` holds (a UNet: the UNet's only)."""
        return [r for r in self.base.refs
                if kind == "checkpoint" or (r.rows and (kind != "unet" or r.rows[0].component == "unet"))]

    def output_bytes(self, kind: SaveKind) -> int:
        """The data bytes of one output (header not counted)."""
        import math

        from lora_tools.io import fp8

        total = math.prod(fp8.MARKER_SHAPE) if self.fp8 == "scaled" else 0  # the scaled form's marker
        for r in self._refs_written(kind):
            if self.fp8 is None:
                total += r.nbytes // DTYPE_SIZES[r.dtype] * DTYPE_SIZES[self.output_dtype(r.dtype)]
                continue
            for name, shape in _written(r, kind):
                numel = r.nbytes // DTYPE_SIZES[r.dtype] // max(1, len(r.rows) if kind == "unet" else 1)
                if fp8.is_fp8_target(r.rows[0].component if r.rows else None, name, shape, self.fp8):
                    total += numel + (4 if self.fp8 == "scaled" else 0)
                else:
                    total += numel * DTYPE_SIZES[r.dtype]
        return total

    def fp16_bytes(self, kind: SaveKind) -> int:
        """The data bytes the same output takes with every float tensor in fp16 (what fp8 is compared with)."""
        from lora_tools.io.safetensors import is_float_dtype

        total = 0
        for r in self._refs_written(kind):
            total += r.nbytes // DTYPE_SIZES[r.dtype] * (2 if is_float_dtype(r.dtype) else DTYPE_SIZES[r.dtype])
        return total

    def predicted_peak_bytes(self) -> int:
        """Interpreter and torch, the read buffers' ring (reads and writes in flight), the largest
        tensor (whole, plus its output copy when the dtype changes), and the staging buffers."""
        from lora_tools.engine.buffers import RING_BYTES
        from lora_tools.engine.pipeline import MAX_INFLIGHT_BYTES

        largest = max((r.nbytes for r in self.base.refs), default=0)
        if self.out_dtype is not None or self.fp8 is not None:
            largest *= 3  # an output copy of up to twice the bytes (fp16 -> fp32)
        return _RUNTIME_BYTES + max(RING_BYTES, 2 * MAX_INFLIGHT_BYTES) + largest + 16 * len(self.outputs) * (1 << 20)

    def close(self) -> None:
        self.base.close()
        for s in self.loras:
            s.adapter.close()
        for d in self.diffs:
            d.tuned.close()
            d.original.close()


def plan_fuse(
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
    verify_output: bool = False,
    fp8: Fp8Form | None = None,
    lightning: int | None = None,
    lightning_strength: float | None = None,
    lightning_dir: str | Path | None = None,
) -> FusePlan:
    """Resolve sources and check everything a fuse needs; nothing is written.

    Args:
        base: single-file checkpoint, diffusers UNet file or diffusers folder.
        preset: the acceleration preset to fuse in (``"lightning-4step"``; see
            :func:`lora_tools.presets.get_preset`), or ``None``.
        method: ``lora`` (fuse the preset's LoRA) or ``unet`` (add the difference between the
            preset's UNet and the SDXL base UNet). A preset without a LoRA (Lightning 1-step)
            always uses ``unet``.
        loras: extra ``(source, strength)`` pairs: local paths or ``owner/repo/file`` hub references.
        saves: outputs to write: ``checkpoint`` (single file in the base's layout), ``unet``
            (standalone diffusers-layout UNet), ``diffusers`` (pipeline folder).
        output: output path (the checkpoint's, or the only output's); default next to the base.
        dtype: ``keep``, ``fp16``, ``bf16`` or ``fp32`` for float tensors of the outputs; ``fp8``: the UNet's
            linear weights (plain form: and conv weights) in float8_e4m3fn (the rest keeps its dtype; see
            :mod:`lora_tools.io.fp8`).
        fp8: with ``dtype="fp8"``: ``scaled`` (per-tensor ``scale_weight`` and the ``scaled_fp8`` marker, as
            ComfyUI reads scaled fp8; linear weights only, as ComfyUI scales only those) or ``plain`` (the weights cast to e4m3fn).
        preset_strength: strength of the preset's LoRA or difference (default 1.0); only with ``preset``.
        preset_dir: a local folder holding the preset's files (instead of the hub).
        allow_unmatched: skip LoRA modules that have no target instead of failing.
        force: fuse into a model that already has a preset fused in, or the same LoRA twice.
        overwrite: replace existing outputs (inputs are never overwritten).
        revision: hub revision for hub downloads.
        original_unet: the SDXL base UNet (diffusers layout) for ``method="unet"``, and the reference a
            preset LoRA is looked for in the base with (:func:`lora_tools.ops.baked.check_not_baked`).
        variant: weights variant of a diffusers-folder base (``fp16``).
        hash_base: record the base's full sha256 even when it is large.
        verify_output: before each output is renamed to its name, read its data back and check
            its sha256 against what was written (one more pass over each output).
        lightning: deprecated alias: ``lightning=4`` is ``preset="lightning-4step"``.
        lightning_strength: deprecated alias of ``preset_strength``.
        lightning_dir: deprecated alias of ``preset_dir``.

    Returns:
        `FusePlan`: run it with :func:`lora_tools.ops.fuse.run_fuse`, then ``close()`` it.

    Raises:
        UsageError: nothing to fuse, conflicting or out-of-range arguments, a preset fused twice.
        OutputExistsError: an output exists and ``overwrite`` is not set.
        OutputError: an output path of the wrong kind, or not enough free space for the outputs
            (``not enough space on X: need N, have M``).
        NonFiniteError: a LoRA holds NaN/Inf.
        KeyMismatchError, ShapeMismatchError, UnsupportedModelError: the sources do not fit the base.
    """
    from lora_tools.hub import resolve_file, resolve_source

    accel = _preset_argument(preset, lightning)
    strength = _first(preset_strength, lightning_strength, name="preset_strength")
    folder = _first(preset_dir, lightning_dir, name="preset_dir")
    if accel is None and strength is not None:
        raise UsageError(f"A preset strength ({strength:g}) was given without a preset",
                         hint=Hint("preset", "to choose the preset it applies to", "NAME"))
    strength = 1.0 if strength is None else strength
    if not math.isfinite(strength) or abs(strength) > MAX_STRENGTH:
        raise UsageError(f"The preset strength {strength:g} is out of range: use a number between "
                         f"-{MAX_STRENGTH:g} and {MAX_STRENGTH:g}.")
    if accel is None and not loras:
        raise UsageError("Nothing to fuse: no acceleration preset and no LoRA",
                         hint=Hint("preset", "and/or LoRAs", "NAME"))
    fp8_form = _fp8_form(dtype, fp8, saves)
    if dtype not in ("keep", "fp8") and DTYPE_ALIASES.get(dtype) is None:
        raise UsageError(f"Unknown dtype '{dtype}': choose keep, fp16, bf16, fp32 or fp8.")
    if accel is not None and accel.lora_file is None and method == "lora":
        method = "unet"  # 1 step exists only as a full UNet (x0 prediction)
    if accel is not None and accel.unet_file is None and method == "unet":
        raise UsageError(f"The preset {accel.name} ships no UNet file to fuse", hint=Hint("method", "to fuse its LoRA", "lora"))
    model = open_model(base, variant=variant)
    plan_loras: list[LoraSource] = []
    diffs: list[DiffSource] = []
    warnings: list[str] = []
    try:
        if model.fp8 is not None:  # read as weight x scale_weight (lora_tools.io.fp8); "keep" keeps its fp8 form
            warnings.append(f"'{model.path}' is {model.fp8.describe()}: it is fused from its dequantised weights, "
                            "and the result inherits their fp8 rounding.")
            if dtype == "keep":
                fp8_form = _fp8_form("fp8", fp8 or model.fp8.form, saves)
        _check_base(model, accel, force)
        index = _HeldTargets(TargetIndex(model.cfg.table), model.kind.components)
        # (file, strength, label, preset, whether the preset is only inferred from the file name)
        sources: list[tuple[Path, float, str, AccelerationPreset | None, bool]] = []
        if accel is not None and method == "lora":
            assert accel.lora_file is not None
            path = _preset_file(accel, accel.lora_file, folder, revision, resolve_file)
            sources.append((path, strength, accel.name, accel, False))
        for src, src_strength in loras:
            path = as_path(src) if is_url(src) else resolve_source(src, revision=revision)  # an object: read in place
            sources.append((path, src_strength, Path(src).name, identify_file(Path(src).name), True))
        seen: dict[str, str] = {}
        hashes = _hash_in_background([path for path, *_ in sources])
        for path, src_strength, label, src_preset, by_name in sources:
            _refuse_input_as_output(path, output)
            adapter = load_lora(path)
            source = _match(adapter, index, model, src_strength, label, src_preset, allow_unmatched, warnings)
            plan_loras.append(_check_named_preset(source, model, warnings) if by_name else source)
            resolved = str(path.resolve())
            if resolved in seen and not force:
                raise UsageError(f"'{path}' is given twice: applying a LoRA twice doubles its effect",
                                 hint=Hint("force", "to do it anyway"))
            seen[resolved] = label
        if accel is not None and method == "unet":
            assert accel.unet_file is not None  # refused above
            tuned = _preset_file(accel, accel.unet_file, folder, revision, resolve_file)
            original = Path(original_unet) if original_unet else _base_unet(folder, revision, resolve_file)
            diffs.append(_diff_source(model, tuned, original, strength, accel))
        patches: dict[str, list[tuple[LoraSource, MatchedModule]]] = {}
        for s in plan_loras:
            for mm in s.match.matched:
                for key in mm.keys:  # its weight and, with a bias diff, its bias
                    patches.setdefault(key, []).append((s, mm))
        _check_patch_targets(model, patches)
        if accel is None:
            accel = _preset_among(plan_loras)
            if accel is not None:
                _check_base(model, accel, force)
        check_not_baked(model, [(s.label, s.adapter, s.preset) for s in plan_loras if s.preset is not None],
                        reference=original_unet, preset_dir=folder, force=force)
        warnings[(0 if model.fp8 is None else 1):0] = base_warnings(model, accel)
        out_dtype = None if dtype in ("keep", "fp8") else DTYPE_ALIASES[dtype]
        protected = [d.tuned.path for d in diffs] + [d.original.path for d in diffs]
        outputs = _outputs(model, saves, output, accel, plan_loras, method, overwrite, protected)
        sampler = accel.sampler if accel is not None else None
        unmatched = [f"{s.label}: {m.component}:{m.name}" for s in plan_loras for m in s.match.unmatched]
        plan = FusePlan(model, plan_loras, diffs, outputs, out_dtype, sampler, accel, method, patches,
                        warnings, unmatched, overwrite, hash_base, verify_output, hashes, fp8_form)
        check_free_space(plan)
        return plan
    except BaseException:
        model.close()
        for s in plan_loras:
            s.adapter.close()
        raise


def _fp8_form(dtype: str, form: str | None, saves: Sequence[str]) -> Fp8Form | None:
    """The fp8 form of a fuse (``None`` unless ``dtype`` is ``fp8``); fp8 is written to single files and
    standalone UNets only (diffusers cannot load a scaled fp8 folder). Without a form: scaled, or plain when a
    standalone UNet is written, as ComfyUI reads the scaled form (its marker, ``scale_weight``) in single files only
    and would load a scaled diffusers-layout UNet's weights unscaled."""
    from lora_tools.io.fp8 import FP8_FORMS

    if form is not None and form not in FP8_FORMS:
        raise UsageError(f"Unknown fp8 form '{form}': choose scaled or plain.")
    if dtype != "fp8":
        if form == "plain" and dtype != "keep":  # keep: an fp8 base keeps its own form
            raise UsageError(f"The fp8 form 'plain' applies to fp8 outputs, and the dtype is {dtype}",
                             hint=Hint("dtype", "for fp8", "fp8"))
        return None
    if "diffusers" in saves:
        raise UsageError("fp8 is written to single files and standalone UNets, not to a diffusers folder",
                         hint=Hint("saves", "to write one of those", "checkpoint"))
    if "unet" in saves:
        if form == "scaled":
            raise UsageError("Scaled fp8 is written to single files only: ComfyUI reads a standalone UNet's "
                             "scale_weight as unscaled weights", hint=Hint("fp8", "for a standalone UNet", "plain"))
        return "plain"
    return "scaled" if form is None else form


def _written(ref: TensorRef, kind: str) -> list[tuple[str, tuple[int, ...]]]:
    """The (name, shape) pairs a base tensor becomes in an output of ``kind``."""
    if kind == "checkpoint":
        return [(ref.key, tuple(ref.shape))]
    return [(row.diffusers, tuple(row.diffusers_shape)) for row in ref.rows if row.diffusers is not None]


def check_free_space(plan: FusePlan) -> None:
    """Refuse a plan whose outputs do not fit on their file systems (outputs sharing one are
    counted together), by the rule :func:`lora_tools.io.atomic.reserve_space` applies when
    the writing starts; nothing stays reserved.

    Raises:
        OutputError: ``not enough space on X for Y: need N, have M``.
    """
    held: list[tuple[int, int]] = []
    try:
        for o in plan.outputs:
            nbytes = plan.output_bytes(o.kind)
            probe = o.path / "unet" / "diffusion_pytorch_model.safetensors" if o.kind == "diffusers" else o.path
            held.append((atomic.reserve_space(probe, nbytes), nbytes))
    finally:
        for dev, nbytes in held:
            atomic.release_space(dev, nbytes)


def _preset_argument(preset: str | AccelerationPreset | None, lightning: int | None) -> AccelerationPreset | None:
    """The preset asked for: by name, as a preset, or through the deprecated ``lightning=N``."""
    chosen = preset if isinstance(preset, AccelerationPreset) or preset is None else get_preset(preset)
    if lightning is not None:
        warn_deprecated("lightning", f'preset="lightning-{lightning}step"')
        by_steps = lightning_preset(lightning)
        if chosen is not None and chosen.name != by_steps.name:
            raise UsageError(f"Two presets given: '{chosen.name}' and Lightning {lightning}-step; choose one.")
        chosen = by_steps
    return chosen


def _first(value: T, alias: T, *, name: str) -> T:
    """A parameter and its deprecated alias (``lightning_*``); both given must agree."""
    if alias is None:
        return value
    warn_deprecated(name.replace("preset_", "lightning_"), name)
    if value is not None and value != alias:
        raise UsageError(f"'{name}' is given twice, with different values ({value} and {alias}).")
    return alias


def warn_deprecated(old: str, new: str) -> None:
    import warnings

    warnings.warn(f"plan_fuse({old}=...) is deprecated: use {new}.", DeprecationWarning, stacklevel=4)


def _hash_in_background(paths: list[Path]) -> dict[Path, Future[str]]:
    """sha256 of the LoRA files for the record, hashed beside the checks that read them anyway."""
    from lora_tools.io.hashing import sha256_file

    if not paths:
        return {}
    pool = ThreadPoolExecutor(1, thread_name_prefix="loratool-hash-sources")
    futures = {p: pool.submit(sha256_file, p) for p in paths}
    pool.shutdown(wait=False)
    return futures


def _preset_among(loras: list[LoraSource]) -> AccelerationPreset | None:
    """An acceleration LoRA passed with the other LoRAs (recognised by name or sha256) sets the sampler too."""
    found = {s.preset.name: s.preset for s in loras if s.preset is not None}
    if len(found) > 1:
        raise UsageError(f"Several acceleration LoRAs given ({', '.join(sorted(found))}): a model is distilled for one sampler.")
    return next(iter(found.values()), None)


def _check_named_preset(source: LoraSource, model: ModelSource, warnings: list[str]) -> LoraSource:
    """A ``--lora`` recognised as a Lightning LoRA by its file name alone stays one only when its
    keys have the Lightning key signature (the check inspect makes); otherwise the warning inspect
    gives, and it is fused as the plain LoRA it is: not named, recorded or advised as Lightning."""
    from lora_tools.ops.inspect.acceleration import acceleration, lightning_signature, misleading_name

    if source.preset is None or source.preset.family != "lightning":
        return source  # inspect's name check (and its words) is Lightning's
    if lightning_signature(source.adapter, source.match, model.cfg):
        return source
    warning = misleading_name(acceleration(source.label, None, {}, False), source.label)
    if warning is None:  # inspect would not distrust the name either
        return source
    warnings.append(f"{warning} Fusing it as a plain LoRA, not as {preset_title(source.preset.name)}.")
    return replace(source, preset=None)


def _check_base(model: ModelSource, preset: AccelerationPreset | None, force: bool) -> None:
    """Refuse a base nothing can be fused into, or one that already has a preset fused in."""
    kind = model.kind
    if kind.architecture != "sdxl-inpaint" and not kind.supported:
        raise UnsupportedModelError(f"'{model.path}' is not supported: {kind.why_unsupported()}.")
    if "unet" not in kind.components:
        raise UnsupportedModelError(f"'{model.path}' has no UNet (model.diffusion_model.*): nothing to fuse into.")
    done = fused_preset(model.metadata)
    if preset is not None and done is not None and not force:
        raise UsageError(f"'{model.path}' already has {preset_title(done)} fused into it by lora_tools; fusing again "
                         "gives black images. Use the original base", hint=Hint("force", "to fuse anyway"))


def base_warnings(model: ModelSource, preset: AccelerationPreset | None) -> list[str]:
    """What may go wrong with a base lora_tools can fuse into (inpainting, v-prediction), naming the
    preset being fused in (``preset.label``), or SDXL LoRAs in general when there is none."""
    kind = model.kind
    warnings = []
    if kind.architecture == "sdxl-inpaint":
        made = (f"{preset.label} was distilled from" if preset is not None
                else "SDXL LoRAs are usually trained on")
        warnings.append(f"'{model.path}' is an SDXL inpainting model (9-channel input); {made} the 4-channel SDXL "
                        "base, so results may differ from the model card.")
    if kind.prediction != "epsilon":
        what = (f"{preset.label} was distilled for epsilon-prediction SDXL and will likely misbehave"
                if preset is not None else "SDXL LoRAs are usually trained on epsilon-prediction SDXL and may misbehave")
        warnings.append(f"'{model.path}' is a {kind.prediction} model (markers: {', '.join(kind.markers)}); {what}.")
    return warnings


def preset_title(name: str) -> str:
    """How people name a preset: ``Lightning 4-step`` for ``lightning-4step``, else the name."""
    import re

    m = re.fullmatch(r"lightning-(\d+)step", name)
    return f"Lightning {m.group(1)}-step" if m else name


def _preset_file(preset: AccelerationPreset, filename: str, folder: str | Path | None, revision: str | None,
                 resolve_file) -> Path:
    if folder is not None:
        path = Path(folder) / filename
        if not path.exists():
            raise UsageError(f"'{path}' does not exist: the preset folder must hold the {preset.repo_id} file '{filename}'",
                             hint=Hint("preset_dir", "naming a folder that holds it", "DIR"))
        return path
    if filename == preset.lora_file:  # the downloaded LoRA can be passed as a LoRA
        return resolve_file(preset.repo_id, filename, revision=revision)
    # a UNet (--method unet) cannot: it is read from a preset folder
    return resolve_file(preset.repo_id, filename, revision=revision,
                        hint=Hint("preset_dir", "naming a folder that holds the downloaded file", "DIR"))


def _base_unet(folder: str | Path | None, revision: str | None, resolve_file) -> Path:
    if folder is not None:
        for name in BASE_UNET_NAMES:
            if (Path(folder) / name).exists():
                return Path(folder) / name
    return resolve_file(SDXL_BASE_REPO, SDXL_BASE_UNET_FILE, hint=Hint("original_unet", "with the downloaded file", "PATH"))


class _HeldTargets:
    """The base's targets, only in the components the base holds: a text-encoder module of a LoRA
    is unmatched on a UNet-only base (not checked against text-encoder shapes the file lacks)."""

    def __init__(self, index: TargetIndex, components: Sequence[str]):
        self._index, self.components = index, tuple(components)

    def lookup(self, component: str, name: str):
        return self._index.lookup(component, name) if component in self.components else None  # type: ignore[arg-type]

    def why_not(self, component: str, name: str) -> str | None:
        """Why a module has no target (see :meth:`TargetIndex.why_not`); ``None`` for absent components."""
        return self._index.why_not(component, name) if component in self.components else None  # type: ignore[arg-type]


def _absent_components(m: LoraMatch, held: Sequence[str]) -> str:
    """Why some unmatched modules cannot match: ``the base has no text encoders`` (or ``''``)."""
    absent = sorted({u.component for u in m.unmatched} - set(held))
    if not absent:
        return ""
    if set(absent) <= {"te1", "te2"} and not {"te1", "te2"} & set(held):
        return "the base has no text encoders"
    return f"the base does not hold {', '.join(absent)}"


def _match(adapter: LoraAdapter, index: _HeldTargets, model: ModelSource, strength: float, label: str,
           preset: AccelerationPreset | None, allow_unmatched: bool, warnings: list[str]) -> LoraSource:
    try:
        raise_factor_problems(adapter)
        m = match_lora(adapter, index, base=str(model.path))  # type: ignore[arg-type]
    except ShapeMismatchError:
        adapter.close()
        raise
    why = _absent_components(m, index.components)
    if not m.matched:
        adapter.close()
        raise KeyMismatchError(f"Cannot fuse: {m.describe_unmatched(str(model.path))}" + (f" ({why})" if why else ""))
    if m.unmatched:
        if not allow_unmatched:
            adapter.close()
            if why and len(m.unmatched) == sum(u.component not in index.components for u in m.unmatched):
                raise KeyMismatchError(f"Cannot fuse: {len(m.unmatched)} modules of '{adapter.path}' change "
                                       f"{', '.join(sorted({u.component for u in m.unmatched}))}, but {why} "
                                       f"('{model.path}' holds {', '.join(model.kind.components)})",
                                       hint=Hint("allow_unmatched", "to skip them"))
            raise KeyMismatchError(f"Cannot fuse: {m.describe_unmatched(str(model.path))}" + (f" ({why})" if why else ""),
                                   hint=Hint("allow_unmatched", "to skip them"))
        warnings.append(f"skipping {len(m.unmatched)} unmatched modules of '{adapter.path}'" + (f" ({why})" if why else ""))
    max_abs = _check_finite(adapter)
    if not math.isfinite(strength) or abs(strength) > MAX_STRENGTH:
        adapter.close()
        raise UsageError(f"The strength {strength:g} of '{label}' is out of range: use a number between -{MAX_STRENGTH:g} and {MAX_STRENGTH:g}.")
    return LoraSource(adapter, m, strength, label, preset, max_abs)


def _check_finite(adapter: LoraAdapter) -> dict[str, float]:
    """Refuse NaN/Inf anywhere in the LoRA (the shared check every LoRA op runs); return each
    float tensor's largest magnitude, which bounds the deltas for the patcher. A named step of
    its own so ``benchmarks/profile_fuse.py`` can time it. A LoRA file is checked without torch:
    the plan does not wait for torch to load."""
    return raise_non_finite(adapter, verb="fuse")


def _check_patch_targets(model: ModelSource, patches: dict[str, list[tuple[LoraSource, MatchedModule]]]) -> None:
    for key, contribs in patches.items():
        if key not in model:
            _, mm = contribs[0]
            raise KeyMismatchError(f"'{model.path}' has no tensor '{key}' (needed by module '{mm.module.name}').")


def _diff_source(model: ModelSource, tuned: Path, original: Path, strength: float, preset: AccelerationPreset) -> DiffSource:
    t, o = SafetensorsSource(tuned), SafetensorsSource(original)
    want = {}
    for r in model.refs:
        dkey = r.rows[0].diffusers if r.rows and r.rows[0].component == "unet" else None
        if dkey is not None:
            want[dkey] = r
    for src in (t, o):
        keys = set(src.keys())
        missing = sorted(set(want) - keys)
        if missing:
            raise KeyMismatchError(f"'{src.path}' is not a diffusers SDXL UNet matching '{model.path}' "
                                   f"({len(missing)} keys missing, first: {missing[0]}).")
        for dkey, ref in want.items():
            if src.meta(dkey).shape != ref.rows[0].diffusers_shape:
                raise ShapeMismatchError(f"'{src.path}': '{dkey}' is {list(src.meta(dkey).shape)}, the base has "
                                         f"{list(ref.rows[0].diffusers_shape)}.")
    return DiffSource(t, o, strength, f"{preset.name} (unet add-difference)", preset)


def default_stem(base: Path, preset: AccelerationPreset | None, loras: list[LoraSource], method: Method) -> str:
    """The default output name of a fuse (see :func:`lora_tools.output.plan.default_stem`)."""
    return output_plan.default_stem(base, preset, [s.label for s in loras if s.preset is None], method)


def _outputs(model: ModelSource, saves: Sequence[SaveKind], output: str | Path | None, preset: AccelerationPreset | None,
             loras: list[LoraSource], method: Method, overwrite: bool, protected: Sequence[Path] = ()) -> list[OutputSpec]:
    kinds: list[SaveKind] = list(dict.fromkeys(saves or ("checkpoint",)))
    for k in kinds:
        if k not in SAVE_KINDS:
            raise UsageError(f"Unknown output kind '{k}' in saves: choose checkpoint, unet or diffusers.")
    if "diffusers" in kinds and set(model.kind.components) != {"unet", "te1", "te2", "vae"}:
        raise UsageError(f"A diffusers folder output needs a full model, '{model.path}' holds only {', '.join(model.kind.components)}.")
    folder, stem = model.path.parent, (default_stem(model.path, preset, loras, method) if output is None else "")
    specs = [OutputSpec(k, p) for k, p in output_paths(kinds, output, folder, stem)]
    inputs = [model.path, *(s.path for s in loras), *(as_path(p) for p in protected)]
    for s in specs:
        output_plan.refuse_input_as_output(s.path, inputs)
        output_plan.check_output(s.path, "folder" if s.kind == "diffusers" else "file", overwrite=overwrite)
    return specs


def output_paths(saves: Sequence[SaveKind], output: str | Path | None, folder: Path | None = None,
                 stem: str = "") -> list[tuple[SaveKind, Path]]:
    """The path of each output kind of a fuse, in ``saves`` order: the one place fuse outputs are named.

    With one kind, ``output`` is that output's path; with several, ``output`` names the checkpoint and
    the others go beside it (``STEM-unet.safetensors``, ``STEM-diffusers``). Without ``output``, they
    are named ``stem`` in ``folder`` (the default name, next to the base).
    """
    kinds: list[SaveKind] = list(dict.fromkeys(saves or ("checkpoint",)))
    if output is not None:
        out = as_path(output)
        folder, stem = out.parent, (out.name if kinds == ["diffusers"] else out.stem)
        if len(kinds) == 1:
            return [(kinds[0], out)]
    assert folder is not None
    names = {"checkpoint": f"{stem}.safetensors", "unet": f"{stem}-unet.safetensors", "diffusers": f"{stem}-diffusers"}
    return [(k, folder / names[k]) for k in kinds]


def _inside(path: Path, folder: Path) -> bool:
    return output_plan.inside(path, folder)


def _refuse_input_as_output(path: Path, output: str | Path | None) -> None:
    if output is not None:
        output_plan.refuse_input_as_output(as_path(output), [path])


__all__ = ["plan_fuse", "FusePlan", "OutputSpec", "LoraSource", "DiffSource", "SAVE_KINDS", "default_stem", "output_paths"]
