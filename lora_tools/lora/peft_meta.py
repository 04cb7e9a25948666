"""Alphas in ``lora_adapter_metadata``: the PEFT ``LoraConfig`` fields diffusers and PEFT store.

Three layouts are read, as PEFT and diffusers write them:

- per component (diffusers' ``save_lora_weights``): ``{"unet.r": 4, "unet.lora_alpha": 8,
  "unet.alpha_pattern": {...}, "text_encoder.lora_alpha": ...}``;
- flat (PEFT's own ``LoraConfig`` and diffusers' ``save_lora_adapter``): ``{"r": 4,
  "lora_alpha": 8, "alpha_pattern": {...}, "rank_pattern": {...}}``;
- with ``use_rslora`` (scale ``alpha / sqrt(r)``), turned into the equivalent kohya alpha.

Pattern keys match a module name as PEFT's ``get_pattern_key`` does: ``(.*\\.)?(<key>)$``.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from lora_tools.layouts.table import Component

METADATA_KEY = "lora_adapter_metadata"
#: diffusers' component prefix inside the per-component layout.
COMPONENT_PREFIX: dict[Component, str] = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}


def parse(metadata: Mapping[str, str]) -> dict[str, Any]:
    """The decoded ``lora_adapter_metadata`` object, or ``{}`` when absent or not a JSON object."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def config_for(data: Mapping[str, Any], component: Component) -> dict[str, Any]:
    """The ``LoraConfig`` fields that apply to ``component`` (per-component layout first, then flat)."""
    prefix = COMPONENT_PREFIX[component] + "."
    scoped = {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}
    if scoped:
        return scoped
    if any("." in k for k in data if k.split(".", 1)[0] in COMPONENT_PREFIX.values()):
        return {}  # per-component metadata for other components only
    return dict(data)


def _pattern_value(patterns: object, module: str) -> object | None:
    if not isinstance(patterns, dict):
        return None
    for pat, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({pat})$", module):
                return value
        except re.error:
            continue
    return None


def alpha_for(data: Mapping[str, Any], component: Component, module: str, rank: int) -> float | None:
    """The kohya-equivalent alpha PEFT applies to ``module`` (``scale = alpha / rank``), or ``None``."""
    cfg = config_for(data, component)
    if not cfg:
        return None
    value = _pattern_value(cfg.get("alpha_pattern"), module)
    if value is None:
        value = cfg.get("lora_alpha")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    alpha = float(value)
    if cfg.get("use_rslora") is True and rank > 0:
        alpha = alpha * rank / math.sqrt(rank)  # alpha / sqrt(r) == alpha' / r
    return alpha


def build(modules: Iterable[tuple[Component, str, int, float | None, bool]], *, flat: bool) -> dict[str, Any]:
    """The ``lora_adapter_metadata`` object for modules ``(component, name, rank, alpha, dora)``.

    The most common rank and alpha become ``r`` and ``lora_alpha``; others go into
    ``rank_pattern``/``alpha_pattern`` keyed by the module name (:func:`config_name`). An absent
    alpha is written as the rank (scale 1).
    """
    by_comp: dict[Component, list[tuple[str, int, float, bool]]] = {}
    for comp, name, rank, alpha, dora in modules:
        by_comp.setdefault(comp, []).append((config_name(comp, name), rank, float(rank) if alpha is None else float(alpha),
                                             dora))
    out: dict[str, Any] = {}
    for comp, mods in by_comp.items():
        r = Counter(m[1] for m in mods).most_common(1)[0][0]
        a = Counter(m[2] for m in mods).most_common(1)[0][0]
        cfg: dict[str, Any] = {
            "r": r, "lora_alpha": _num(a),
            "rank_pattern": {m[0]: m[1] for m in mods if m[1] != r},
            "alpha_pattern": {m[0]: _num(m[2]) for m in mods if m[2] != a},
            "target_modules": sorted({m[0] for m in mods}),
            "use_dora": any(m[3] for m in mods),
        }
        if flat:
            out.update(cfg)
        else:
            out.update({f"{COMPONENT_PREFIX[comp]}.{k}": v for k, v in cfg.items()})
    return out


#: The root module transformers 5 flattened away in ``CLIPTextModel`` (``text_model.encoder...``
#: became ``encoder...``) but ``CLIPTextModelWithProjection`` keeps.
_TE_ROOT = "text_model."


def config_name(component: Component, name: str) -> str:
    """``name`` as a ``LoraConfig`` field names it: text-encoder modules without the ``text_model.``
    root, so ``target_modules`` and the patterns match by suffix (PEFT's ``check_target_module_exists``
    and ``get_pattern_key``) in both the flattened (transformers 5) and the nested CLIP layouts.
    diffusers strips the root from the state dict's keys, not from the metadata."""
    if component != "unet" and name.startswith(_TE_ROOT):
        return name[len(_TE_ROOT):]
    return name


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x
