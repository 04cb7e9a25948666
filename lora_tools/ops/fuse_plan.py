"""Plan a fuse: resolve every source, match every module, check everything, write nothing.

All errors happen here, before a single byte of output exists: unmatched modules, shapes,
architecture, non-finite LoRA factors, double application, outputs that already exist.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import Future, ThreadPoolExecutor
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping, Sequence

from lora_tools.errors import (KeyMismatchError, OutputExistsError, ShapeMismatchError, UnsupportedModelError,
                               UsageError)
from lora_tools.layouts.targets import TargetIndex
from lora_tools.lora.formats import load_lora
from lora_tools.lora.model import LoraAdapter
from lora_tools.lora.resolve import LoraMatch, MatchedModule, match_lora
from lora_tools.lora.validate import raise_factor_problems
from lora_tools.models import ModelSource, open_model
from lora_tools.presets import (LIGHTNING_REPO, SDXL_BASE_REPO, SDXL_BASE_UNET_FILE, AccelerationPreset,
                                SamplerSettings, identify_file, lightning_preset)
from lora_tools.provenance import fused_lightning_steps
from lora_tools.safetensors_io import DTYPE_ALIASES, DTYPE_SIZES
from lora_tools.sources import SafetensorsSource

logger = logging.getLogger(__name__)

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
    lightning_steps: int | None
    method: Method
    patches: dict[str, list[tuple[LoraSource, MatchedModule]]]
    warnings: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    overwrite: bool = False
    hash_base: bool = False
    hashes: dict[Path, "Future[str]"] = field(default_factory=dict)  # sha256 of LoRA files, computed while planning

    def sha256_of(self, path: Path) -> str:
        from lora_tools.hub import sha256_file

        future = self.hashes.get(path)
        return future.result() if future is not None else sha256_file(path)

    def output_dtype(self, dtype: str) -> str:
        from lora_tools.safetensors_io import is_float_dtype

        return self.out_dtype if self.out_dtype and is_float_dtype(dtype) else dtype

    def patched_keys(self) -> set[str]:
        keys = set(self.patches)
        if self.diffs:
            keys |= {r.key for r in self.base.refs if r.rows and r.rows[0].component == "unet"}
        return keys

    def modules_per_block(self) -> Counter[str]:
        c: Counter[str] = Counter()
        for contributions in self.patches.values():
            for _, mm in contributions:
                c[f"{mm.target.component}:{mm.target.block}"] += 1
        return c

    def output_bytes(self, kind: SaveKind) -> int:
        total = 0
        for r in self.base.refs:
            if kind != "checkpoint" and not r.rows:
                continue
            if kind == "unet" and r.rows[0].component != "unet":
                continue
            total += r.nbytes // DTYPE_SIZES[r.dtype] * DTYPE_SIZES[self.output_dtype(r.dtype)]
        return total

    def predicted_peak_bytes(self) -> int:
        """Interpreter and torch, the read buffers' ring (reads and writes in flight), the largest
        tensor (whole, plus its output copy when the dtype changes), and the staging buffers."""
        from lora_tools.ops.buffers import RING_BYTES
        from lora_tools.ops.streaming import MAX_INFLIGHT_BYTES

        largest = max((r.nbytes for r in self.base.refs), default=0)
        if self.out_dtype is not None:
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
    *,
    lightning: int | None = None,
    method: Method = "lora",
    loras: Sequence[tuple[str, float]] = (),
    saves: Sequence[SaveKind] = ("checkpoint",),
    output: str | Path | None = None,
    dtype: str = "keep",
    lightning_strength: float = 1.0,
    allow_unmatched: bool = False,
    force: bool = False,
    overwrite: bool = False,
    revision: str | None = None,
    lightning_dir: str | Path | None = None,
    original_unet: str | Path | None = None,
    variant: str | None = None,
    hash_base: bool = False,
) -> FusePlan:
    """Resolve sources and check everything a fuse needs.

    Args:
        base: single-file checkpoint, diffusers UNet file or diffusers folder.
        lightning: SDXL-Lightning step count (1, 2, 4, 8) or ``None``.
        method: ``lora`` (fuse the Lightning LoRA) or ``unet`` (add the difference between the
            Lightning UNet and the SDXL base UNet). 1 step always uses ``unet``.
        loras: extra ``(source, strength)`` pairs: local paths or ``owner/repo/file`` hub references.
        saves: outputs to write: ``checkpoint`` (single file in the base's layout), ``unet``
            (standalone diffusers-layout UNet), ``diffusers`` (pipeline folder).
        output: output path (the checkpoint's, or the only output's); default next to the base.
        dtype: ``keep``, ``fp16``, ``bf16`` or ``fp32`` for float tensors of the outputs.
    """
    from lora_tools.hub import resolve_file, resolve_source

    if lightning is None and not loras:
        raise UsageError("Nothing to fuse: pass --lightning N and/or --lora SRC.")
    if dtype != "keep" and DTYPE_ALIASES.get(dtype) is None:
        raise UsageError(f"Unknown dtype '{dtype}': choose keep, fp16, bf16 or fp32.")
    preset = lightning_preset(lightning) if lightning is not None else None
    if preset is not None and preset.lora_file is None and method == "lora":
        method = "unet"  # 1 step exists only as a full UNet (x0 prediction)
    model = open_model(base, variant=variant)
    plan_loras: list[LoraSource] = []
    diffs: list[DiffSource] = []
    warnings: list[str] = []
    try:
        _check_base(model, preset, force, warnings)
        index = TargetIndex(model.cfg.table)
        sources: list[tuple[Path, float, str, AccelerationPreset | None]] = []
        if preset is not None and method == "lora":
            assert preset.lora_file is not None
            path = _lightning_file(preset.lora_file, lightning_dir, revision, resolve_file)
            sources.append((path, lightning_strength, preset.name, preset))
        for src, strength in loras:
            path = resolve_source(src, revision=revision)
            sources.append((path, strength, Path(src).name, identify_file(Path(src).name)))
        seen: dict[str, str] = {}
        hashes = _hash_in_background([path for path, *_ in sources])
        for path, strength, label, src_preset in sources:
            _refuse_input_as_output(path, output)
            adapter = load_lora(path)
            plan_loras.append(_match(adapter, index, model, strength, label, src_preset, allow_unmatched, warnings))
            resolved = str(path.resolve())
            if resolved in seen and not force:
                raise UsageError(f"'{path}' is given twice: applying a LoRA twice doubles its effect (pass --force to do it anyway).")
            seen[resolved] = label
        if preset is not None and method == "unet":
            tuned = _lightning_file(preset.unet_file, lightning_dir, revision, resolve_file)
            original = Path(original_unet) if original_unet else _base_unet(lightning_dir, revision, resolve_file)
            diffs.append(_diff_source(model, tuned, original, lightning_strength, preset))
        patches: dict[str, list[tuple[LoraSource, MatchedModule]]] = {}
        for s in plan_loras:
            for mm in s.match.matched:
                patches.setdefault(mm.target.sgm_key, []).append((s, mm))
        _check_patch_targets(model, patches)
        if model.kind.components == ("unet",) and any(mm.target.component != "unet" for c in patches.values() for _, mm in c):
            raise UnsupportedModelError(f"'{base}' holds only a UNet, but a LoRA also changes text encoders.")
        if preset is None:
            preset = _lightning_among(plan_loras)
            if preset is not None:
                lightning = preset.steps
                _check_base(model, preset, force, [])
        out_dtype = None if dtype == "keep" else DTYPE_ALIASES[dtype]
        protected = [d.tuned.path for d in diffs] + [d.original.path for d in diffs]
        outputs = _outputs(model, saves, output, preset, plan_loras, method, overwrite, protected)
        sampler = preset.sampler if preset is not None else None
        unmatched = [f"{s.label}: {m.component}:{m.name}" for s in plan_loras for m in s.match.unmatched]
        return FusePlan(model, plan_loras, diffs, outputs, out_dtype, sampler, lightning, method, patches,
                        warnings, unmatched, overwrite, hash_base, hashes)
    except BaseException:
        model.close()
        for s in plan_loras:
            s.adapter.close()
        raise


def _hash_in_background(paths: list[Path]) -> dict[Path, "Future[str]"]:
    """sha256 of the LoRA files for the record, hashed beside the checks that read them anyway."""
    from lora_tools.hub import sha256_file

    if not paths:
        return {}
    pool = ThreadPoolExecutor(1, thread_name_prefix="loratool-hash-sources")
    futures = {p: pool.submit(sha256_file, p) for p in paths}
    pool.shutdown(wait=False)
    return futures


def _lightning_among(loras: list[LoraSource]) -> AccelerationPreset | None:
    """A Lightning LoRA passed with --lora (recognised by name or sha256) sets the sampler too."""
    found = {s.preset.name: s.preset for s in loras if s.preset is not None and s.preset.family == "lightning"}
    if len(found) > 1:
        raise UsageError(f"Several Lightning LoRAs given ({', '.join(sorted(found))}): a model is distilled for one step count.")
    return next(iter(found.values()), None)


def _check_base(model: ModelSource, preset: AccelerationPreset | None, force: bool, warnings: list[str]) -> None:
    kind = model.kind
    if kind.architecture == "sdxl-inpaint":
        warnings.append(f"'{model.path}' is an SDXL inpainting model (9-channel input); Lightning was distilled from "
                        "the 4-channel base, so results may differ from the model card.")
    elif not kind.supported:
        raise UnsupportedModelError(f"'{model.path}' is not supported: {kind.why_unsupported()}.")
    if "unet" not in kind.components:
        raise UnsupportedModelError(f"'{model.path}' has no UNet (model.diffusion_model.*): nothing to fuse into.")
    if kind.prediction != "epsilon":
        warnings.append(f"'{model.path}' is a {kind.prediction} model (markers: {', '.join(kind.markers)}); "
                        "Lightning was distilled for epsilon-prediction SDXL and will likely misbehave.")
    done = fused_lightning_steps(model.metadata)
    if preset is not None and done is not None and not force:
        raise UsageError(f"'{model.path}' already has Lightning {done}-step fused into it by lora_tools; fusing again "
                         "gives black images. Use the original base, or pass --force.")


def _lightning_file(filename: str, folder: str | Path | None, revision: str | None, resolve_file) -> Path:  # type: ignore[no-untyped-def]
    if folder is not None:
        path = Path(folder) / filename
        if not path.exists():
            raise UsageError(f"'{path}' does not exist: --lightning-dir must hold the ByteDance/SDXL-Lightning file '{filename}'.")
        return path
    return resolve_file(LIGHTNING_REPO, filename, revision=revision, pass_with="--lora PATH (or --lightning-dir DIR)")


def _base_unet(folder: str | Path | None, revision: str | None, resolve_file) -> Path:  # type: ignore[no-untyped-def]
    if folder is not None:
        for name in ("sdxl_base_unet.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                     "diffusion_pytorch_model.safetensors"):
            if (Path(folder) / name).exists():
                return Path(folder) / name
    return resolve_file(SDXL_BASE_REPO, SDXL_BASE_UNET_FILE, pass_with="--original-unet PATH")


def _match(adapter: LoraAdapter, index: TargetIndex, model: ModelSource, strength: float, label: str,
           preset: AccelerationPreset | None, allow_unmatched: bool, warnings: list[str]) -> LoraSource:
    try:
        raise_factor_problems(adapter)
        m = match_lora(adapter, index, base=str(model.path))
    except ShapeMismatchError:
        adapter.close()
        raise
    if not m.matched:
        adapter.close()
        raise KeyMismatchError(f"Cannot fuse: {m.describe_unmatched(str(model.path))}")
    if m.unmatched:
        if not allow_unmatched:
            adapter.close()
            raise KeyMismatchError(f"Cannot fuse: {m.describe_unmatched(str(model.path))} Pass --allow-unmatched to skip them.")
        warnings.append(f"skipping {len(m.unmatched)} unmatched modules of '{adapter.path}'")
    absent = {mm.target.component for mm in m.matched} - set(model.kind.components)
    if absent:
        adapter.close()
        raise UnsupportedModelError(f"'{adapter.path}' changes {', '.join(sorted(absent))}, which '{model.path}' does not hold.")
    max_abs = _check_finite(adapter)
    if not math.isfinite(strength) or abs(strength) > MAX_STRENGTH:
        adapter.close()
        raise UsageError(f"The strength {strength:g} of '{label}' is out of range: use a number between -{MAX_STRENGTH:g} and {MAX_STRENGTH:g}.")
    return LoraSource(adapter, m, strength, label, preset, max_abs)


def _check_finite(adapter: LoraAdapter) -> dict[str, float]:
    """Refuse NaN/Inf anywhere in the LoRA; return each float tensor's largest magnitude (one
    ``aminmax`` pass each: NaN propagates into it), which bounds the deltas for the patcher."""
    import torch

    max_abs: dict[str, float] = {}
    for mod in adapter.modules:
        for key in mod.keys.values():
            t = adapter.source.tensor(key)
            if not t.is_floating_point() or t.numel() == 0:
                continue
            lo, hi = (v.item() for v in torch.aminmax(t))
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ShapeMismatchError(f"'{adapter.path}' holds NaN or Inf values (first in '{key}'): refusing to fuse it.")
            max_abs[key] = max(-lo, hi)
        if mod.alpha is not None and not math.isfinite(mod.alpha):
            raise ShapeMismatchError(f"'{adapter.path}' has a non-finite alpha for module '{mod.name}'.")
    return max_abs


def _check_patch_targets(model: ModelSource, patches: dict[str, list[tuple[LoraSource, MatchedModule]]]) -> None:
    for key, contribs in patches.items():
        if key not in model:
            _, mm = contribs[0]
            raise KeyMismatchError(f"'{model.path}' has no tensor '{key}' (needed by module '{mm.module.name}').")


def _diff_source(model: ModelSource, tuned: Path, original: Path, strength: float, preset: AccelerationPreset) -> DiffSource:
    t, o = SafetensorsSource(tuned), SafetensorsSource(original)
    want = {r.rows[0].diffusers: r for r in model.refs if r.rows and r.rows[0].component == "unet"}
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
    stem = base.name if base.is_dir() else base.stem
    if preset is not None:
        stem += f"-lightning-{preset.steps}step"
        if method == "unet" and preset.lora_file is not None:
            stem += "-unetdiff"
    extra = [s for s in loras if s.preset is None]
    if extra:
        stem += "-" + "-".join(Path(s.label).stem.replace(" ", "_") for s in extra[:2])
        if len(extra) > 2:
            stem += f"-and{len(extra) - 2}more"
    return stem


def _outputs(model: ModelSource, saves: Sequence[SaveKind], output: str | Path | None, preset: AccelerationPreset | None,
             loras: list[LoraSource], method: Method, overwrite: bool, protected: Sequence[Path] = ()) -> list[OutputSpec]:
    kinds = list(dict.fromkeys(saves or ("checkpoint",)))
    for k in kinds:
        if k not in SAVE_KINDS:
            raise UsageError(f"Unknown --save '{k}': choose checkpoint, unet or diffusers.")
    if "diffusers" in kinds and set(model.kind.components) != {"unet", "te1", "te2", "vae"}:
        raise UsageError(f"--save diffusers needs a full model, '{model.path}' holds only {', '.join(model.kind.components)}.")
    if output is not None:
        out = Path(output)
        folder, stem = out.parent, (out.name if kinds == ["diffusers"] else out.stem)
    else:
        folder, stem = model.path.parent, default_stem(model.path, preset, loras, method)
    specs = []
    for k in kinds:
        if k == "checkpoint":
            path = folder / f"{stem}.safetensors" if not (output and len(kinds) == 1) else Path(output)  # type: ignore[arg-type]
        elif k == "unet":
            path = Path(output) if output and len(kinds) == 1 else folder / f"{stem}-unet.safetensors"
        else:
            path = Path(output) if output and len(kinds) == 1 else folder / f"{stem}-diffusers"
        specs.append(OutputSpec(k, path))
    inputs = {model.path.resolve()} | {s.adapter.path.resolve() for s in loras} | {Path(p).resolve() for p in protected}
    for s in specs:
        if s.path.resolve() in inputs or any(_inside(p, s.path) for p in inputs):
            raise UsageError(f"Refusing to write '{s.path}': it is one of the inputs.")
        if s.path.exists() and not overwrite:
            raise OutputExistsError(f"'{s.path}' already exists: pass --overwrite to replace it, or -o to choose another name.")
    return specs


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _refuse_input_as_output(path: Path, output: str | Path | None) -> None:
    if output is not None and Path(output).resolve() == path.resolve():
        raise UsageError(f"Refusing to write '{output}': it is one of the inputs.")


__all__ = ["plan_fuse", "FusePlan", "OutputSpec", "LoraSource", "DiffSource", "SAVE_KINDS", "default_stem"]
