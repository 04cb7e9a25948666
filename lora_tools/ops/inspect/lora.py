"""LoRA analysis: which SDXL layout a LoRA fits, what it adapts (per component and block), and how.

Per-module statistics use the fuse's own rules: the scale is :func:`lora_tools.lora.scale.module_scale`
(alpha = 0 or absent means scale 1), blocks are :func:`lora_tools.layouts.blocks.block_of`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lora_tools.errors import ShapeMismatchError, UnsupportedModelError
from lora_tools.io.sources import SafetensorsSource, StateDictSource
from lora_tools.layouts.blocks import BLOCKS, block_of
from lora_tools.layouts.components import LORA_COMPONENTS, component_label
from lora_tools.layouts.sdxl import FULL, TINY, SDXLConfig
from lora_tools.layouts.targets import TargetIndex
from lora_tools.lora import match as lora_match
from lora_tools.lora.adapter import LoraAdapter, LoraModule
from lora_tools.lora.family import foreign_format_name, loaders_view, metadata_base, sd_hint
from lora_tools.lora.formats import format_description
from lora_tools.lora.match import LoraMatch, MatchedModule
from lora_tools.ops.inspect._common import count, fmt_num, natural
from lora_tools.ops.inspect.acceleration import acceleration, lightning_signature, misleading_name
from lora_tools.ops.inspect.report import (
    Acceleration,
    LoraSummary,
    MismatchedModule,
    ModuleTarget,
    TensorEntry,
    UnmatchedSummary,
)

_LAYOUTS: tuple[tuple[str, SDXLConfig], ...] = (("sdxl", FULL), ("sdxl-tiny", TINY))


@dataclass
class _Fit:
    """One LoRA against one layout: modules that fit, that resolve but do not fit, that do not resolve."""

    layout: str
    cfg: SDXLConfig
    match: LoraMatch  # matched: the modules that fit
    mismatched: list[tuple[LoraModule, str, ShapeMismatchError]]


def lora_summary(path: Path, adapter: LoraAdapter, sha256: str | None,
                 entries: Mapping[str, TensorEntry]) -> tuple[LoraSummary, int]:
    """The :class:`LoraSummary` of ``adapter`` and its number of parameters (alphas not counted).

    Raises:
        [`UnsupportedModelError`]: no module has an SDXL target.
        [`ShapeMismatchError`]: modules resolve by name but none fits by shape.
    """
    foreign = metadata_base(adapter.metadata)
    fit = _choose_layout(path, adapter)
    if foreign is not None and not any(mm.module.component == "unet" for mm in fit.match.matched):
        family, key, value = foreign
        raise UnsupportedModelError(f"'{path}' is a LoRA for {family} ({key} '{value}'), not SDXL: only its text "
                                    "encoder keys resemble SDXL's CLIP-L; it does not fit SDXL.")
    match, cfg = fit.match, fit.cfg
    modules = adapter.modules
    per_component: dict[str, int] = {c: 0 for c in LORA_COMPONENTS}
    for m in modules:
        per_component[m.component] = per_component.get(m.component, 0) + 1
    per_block: dict[str, dict[str, int]] = {}
    blocks: Counter[str] = Counter()
    for mm in match.matched:
        sub = per_block.setdefault(mm.module.component, {})
        sub[mm.target.block] = sub.get(mm.target.block, 0) + 1
        blocks[block_of(mm.target.component, mm.target.sgm_key)] += 1
    per_block = {c: dict(sorted(b.items(), key=lambda kv: natural(kv[0]))) for c, b in per_block.items()}
    ranks = dict(sorted(Counter(m.rank for m in modules).items()))
    alphas = count(fmt_num(m.alpha) if m.alpha is not None else "none" for m in modules)
    scales = count(fmt_num(_scale(m)) for m in modules)
    unmatched = _unmatched_summary(match)
    signature = lightning_signature(adapter, match, cfg) if not fit.mismatched else False
    accel = acceleration(path.name, sha256, adapter.metadata, signature)
    mismatched = tuple(MismatchedModule(f"{m.component}:{m.name}", target, str(err))
                       for m, target, err in fit.mismatched)
    warnings = []
    if mismatched:
        warnings.append(f"{len(mismatched)} module(s) do not fit the SDXL ({fit.layout}) weights they name: "
                        f"{', '.join(x.module for x in mismatched[:5])}"
                        f"{', ...' if len(mismatched) > 5 else ''}.")
    if foreign is not None:
        warnings.append(f"its metadata says it was trained for {foreign[0]} ({foreign[1]} '{foreign[2]}'), not SDXL.")
    name_warning = misleading_name(accel, path.name)
    if name_warning:
        warnings.append(name_warning)
    parameters = sum(math.prod(entries[k].shape) for m in modules for k in m.keys.values())
    summary = LoraSummary(
        format=adapter.format,
        format_description=format_description(adapter.format),
        layout=fit.layout,
        modules=len(modules),
        modules_per_component=per_component,
        modules_per_block=per_block,
        unet_naming=match.naming,
        algorithms=count(_algorithm(m) for m in modules),
        ranks=ranks,
        alphas=dict(sorted(alphas.items(), key=lambda kv: -kv[1])),
        scales=dict(sorted(scales.items(), key=lambda kv: -kv[1])),
        unmatched=unmatched,
        acceleration=accel,
        applies_to=_applies_to(fit.layout, per_component, unmatched, accel),
        blocks={b: blocks[b] for b in BLOCKS if blocks[b]},
        mismatched=mismatched,
        warnings=tuple(warnings),
        naming=adapter.naming,
        spellings=count(m.spelling for m in modules),
        targets=_module_targets(fit),
        loaders=loaders_view(adapter.metadata),
    )
    return summary, parameters


def _module_targets(fit: _Fit) -> tuple[ModuleTarget, ...]:
    """Every module of the LoRA, in file order, with its naming, spelling and target."""
    matched = {(mm.module.component, mm.module.name): mm for mm in fit.match.matched}
    mis = {(m.component, m.name): key for m, key, _ in fit.mismatched}
    out = []
    for m in fit.match.adapter.modules:
        mm = matched.get((m.component, m.name))
        common = (f"{m.component}:{m.name}", m.naming, m.spelling, _algorithm(m))
        if mm is None:
            reason = fit.match.reasons.get((m.component, m.name))
            out.append(ModuleTarget(*common, mis.get((m.component, m.name)), reason=reason))
            continue
        t = mm.target
        out.append(ModuleTarget(*common, t.sgm_key if m.changes_weight else None,
                                t.bias_key if m.changes_bias else None,
                                f"{t.part[0] + 1}/{t.part[1]}" if t.part else None, t.transposed))
    return tuple(out)


def _fit(adapter: LoraAdapter, name: str, cfg: SDXLConfig) -> _Fit:
    """Every module against one layout, collecting shape errors instead of stopping at the first."""
    index = TargetIndex(cfg.table)
    base = f"SDXL ({name})"
    matched: list[MatchedModule] = []
    unmatched: list[LoraModule] = []
    mismatched: list[tuple[LoraModule, str, ShapeMismatchError]] = []
    reasons: dict[tuple[str, str], str] = {}
    for m in adapter.modules:
        target = index.lookup(m.component, m.name)
        if target is None or (m.changes_bias and target.bias_key is None):
            unmatched.append(m)
            why = (lora_match.no_bias_reason(target) if target is not None
                   else index.why_not(m.component, m.name))
            if why is not None:
                reasons[(m.component, m.name)] = why
            continue
        try:
            lora_match._check_shape(adapter, m, target, base)
            _check_lycoris_shape(adapter, m, target.shape, target.sgm_key, name)
        except ShapeMismatchError as e:
            mismatched.append((m, target.sgm_key, e))
            continue
        matched.append(MatchedModule(m, target))
    return _Fit(name, cfg, LoraMatch(adapter, matched, unmatched, reasons), mismatched)


def _choose_layout(path: Path, adapter: LoraAdapter) -> _Fit:
    """Full SDXL, then the tiny test layout: keep the one most modules fit (the first on a tie)."""
    fits = [_fit(adapter, name, cfg) for name, cfg in _LAYOUTS]
    best = max(fits, key=lambda f: len(f.match.matched))  # max keeps the first of equals
    if best.match.matched:
        return best
    resolving = max(fits, key=lambda f: len(f.mismatched))
    if resolving.mismatched:
        raise resolving.mismatched[0][2]
    match = best.match
    names = ", ".join(f"{m.component}:{m.name}" for m in match.unmatched[:3])
    hint = _sd1_hint(match)
    raise UnsupportedModelError(
        f"'{path}' is a {foreign_format_name(adapter.format, match.unmatched)} LoRA that fits no SDXL model: none of its {len(adapter.modules)} "
        f"modules has an SDXL target (first: {names}).{' ' + hint if hint else ''}"
    )


def _check_lycoris_shape(adapter: LoraAdapter, m: LoraModule, want: tuple[int, ...], key: str, layout: str) -> None:
    """LoHa/LoKr shapes, which :func:`match_lora` leaves to delta time."""
    dims = _lycoris_dims(adapter.source, m)
    if dims is not None and dims != (want[0], math.prod(want[1:])):
        raise ShapeMismatchError(
            f"'{adapter.path}': {m.kind} module '{m.name}' gives {dims[0]}x{dims[1]}, "
            f"'{key}' of SDXL ({layout}) is {list(want)}."
        )


def _lycoris_dims(src: SafetensorsSource | StateDictSource, m: LoraModule) -> tuple[int, int] | None:
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
    return sd_hint(match.unmatched)


def _unmatched_summary(match: LoraMatch) -> UnmatchedSummary:
    first = tuple(f"{m.component}:{m.name}" for m in match.unmatched[:5])
    return UnmatchedSummary(len(match.unmatched), first, _sd1_hint(match) if match.unmatched else None)


def _scale(m: LoraModule) -> float:
    """The scale the fuse applies (``LoraModule.scale``: alpha = 0 or absent, full diffs: 1)."""
    return m.scale


def _algorithm(m: LoraModule) -> str:
    if m.kind == "lora" and m.is_dora:
        return "dora"
    return m.algorithm


def _applies_to(layout: str, per_component: Mapping[str, int], unmatched: UnmatchedSummary,
                accel: Acceleration | None) -> str:
    model = ("SDXL 1.0 base and checkpoints derived from it" if layout == "sdxl"
             else "the tiny SDXL-topology test model of lora_tools")
    changed = [c for c in LORA_COMPONENTS if per_component.get(c)]
    untouched = [c for c in LORA_COMPONENTS if not per_component.get(c)]
    text = f"{model} ({', '.join(component_label(c) for c in changed)})"
    if untouched == ["te1", "te2"]:
        text += "; text encoders untouched"
    elif untouched:
        text += "; " + " and ".join(component_label(c) for c in untouched) + " untouched"
    if accel is not None:
        text += "; eps-prediction models only (v-prediction/EDM checkpoints will likely misbehave)"
    if unmatched.count:
        text += f"; {unmatched.count} module(s) have no SDXL target"
    return text
