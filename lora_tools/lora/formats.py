"""LoRA file formats: one key grammar per format, one named detection function per format.

A grammar says which prefixes name which component and which suffixes name which tensor
role. A file is in a format when *every* key parses under that format's grammar; parsing is
total, so an unknown key is an error that names the key, never a silently dropped tensor.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from lora_tools.errors import InvalidFileError, UnknownFormatError
from lora_tools.layouts.table import Component
from lora_tools.lora.model import AdapterKind, AdapterModule, LoraAdapter
from lora_tools.sources import SafetensorsSource, StateDictSource, TensorSource, open_source

_LYCORIS_SUFFIXES = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha",
    "dora_scale": "dora_scale",
    "hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b", "hada_t1": "t1", "hada_t2": "t2",
    "lokr_w1": "w1", "lokr_w1_a": "w1a", "lokr_w1_b": "w1b", "lokr_w2": "w2", "lokr_w2_a": "w2a", "lokr_w2_b": "w2b",
    "lokr_t2": "t2", "diff": "diff", "diff_b": "diff_b",
}
_PEFT_SUFFIXES = {"lora_A.weight": "down", "lora_B.weight": "up", "lora_magnitude_vector": "dora_scale", "alpha": "alpha"}
_LEGACY_SUFFIXES = {
    "lora.down.weight": "down", "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up", "alpha": "alpha",
}
_LEGACY_PROCESSOR = re.compile(r"^(?P<stem>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight$")
_DIFFUSERS_PREFIXES: tuple[tuple[str, Component], ...] = (
    ("text_encoder_2.", "te2"), ("text_encoder.", "te1"), ("unet.", "unet"),
)


@dataclass(frozen=True)
class KeyGrammar:
    """How one format spells keys: ``<prefix><module><sep><suffix>``."""

    name: str
    description: str
    prefixes: tuple[tuple[str, Component], ...]
    suffixes: Mapping[str, str]
    underscored: bool  # module names use "_" (kohya) rather than "."

    def split(self, key: str) -> tuple[Component, str, str] | None:
        """``(component, module, role)`` of a key, or ``None`` if this grammar can't parse it."""
        for prefix, component in self.prefixes:
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            if self.underscored:
                module, _, suffix = rest.partition(".")
                role = self.suffixes.get(suffix)
                return (component, module, role) if role and module else None
            for suffix, role in self.suffixes.items():
                if rest.endswith("." + suffix) and len(rest) > len(suffix) + 1:
                    return component, rest[: -len(suffix) - 1], role
            return None
        return None


KOHYA = KeyGrammar(
    "kohya", "kohya/LyCORIS: lora_unet_/lora_te1_/lora_te2_ + lora_down/lora_up/alpha (also LoCon, LoHa, LoKr, DoRA)",
    (("lora_unet_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te_", "te1"), ("lycoris_", "unet")),
    _LYCORIS_SUFFIXES, underscored=True,
)
COMFY = KeyGrammar(
    "comfy", "ComfyUI-saved: diffusion_model.<SGM path>.lora_down/lora_up/alpha",
    (("diffusion_model.", "unet"), ("text_encoders.clip_l.transformer.", "te1"), ("text_encoders.clip_g.transformer.", "te2")),
    _LYCORIS_SUFFIXES, underscored=False,
)
PEFT = KeyGrammar(
    "peft", "diffusers/PEFT: unet./text_encoder./text_encoder_2. + lora_A/lora_B (alpha from lora_adapter_metadata)",
    _DIFFUSERS_PREFIXES, _PEFT_SUFFIXES, underscored=False,
)
PEFT_RAW = KeyGrammar(
    "peft-raw", "raw PEFT: base_model.model.<module>.lora_A/lora_B",
    (("unet.base_model.model.", "unet"), ("base_model.model.", "unet")), _PEFT_SUFFIXES, underscored=False,
)
DIFFUSERS_LEGACY = KeyGrammar(
    "diffusers-legacy", "old diffusers attention processors: <module>.processor.to_q_lora.down.weight, .lora.down.weight",
    _DIFFUSERS_PREFIXES, _LEGACY_SUFFIXES, underscored=False,
)


def _legacy_split(key: str) -> tuple[Component, str, str] | None:
    """diffusers-legacy keys, including the attention-processor spelling."""
    for prefix, component in _DIFFUSERS_PREFIXES:
        if key.startswith(prefix):
            m = _LEGACY_PROCESSOR.match(key[len(prefix):])
            if m:
                proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
                return component, f"{m['stem']}.{proj}", m["role"]
    return DIFFUSERS_LEGACY.split(key)


def detect_kohya(keys: list[str]) -> bool:
    """kohya/LyCORIS envelope (``lora_unet_...``), SGM or diffusers module names."""
    return _all_parse(keys, KOHYA.split)


def detect_comfy(keys: list[str]) -> bool:
    """ComfyUI-saved keys (``diffusion_model.input_blocks...``)."""
    return _all_parse(keys, COMFY.split)


def detect_peft(keys: list[str]) -> bool:
    """Current diffusers/PEFT keys (``unet....lora_A.weight``)."""
    return _all_parse(keys, PEFT.split)


def detect_peft_raw(keys: list[str]) -> bool:
    """Raw PEFT keys (``base_model.model....lora_A.weight``)."""
    return _all_parse(keys, PEFT_RAW.split)


def detect_diffusers_legacy(keys: list[str]) -> bool:
    """Old diffusers attention-processor keys (``...processor.to_q_lora.down.weight``)."""
    return _all_parse(keys, _legacy_split)


def _all_parse(keys: list[str], split: Callable[[str], object]) -> bool:
    return bool(keys) and all(split(k) is not None for k in keys)


#: name -> (detector, key splitter, grammar); detection tries them in this order.
FORMATS: dict[str, tuple[Callable[[list[str]], bool], Callable[[str], tuple[Component, str, str] | None], KeyGrammar]] = {
    "kohya": (detect_kohya, KOHYA.split, KOHYA),
    "peft": (detect_peft, PEFT.split, PEFT),
    "peft-raw": (detect_peft_raw, PEFT_RAW.split, PEFT_RAW),
    "diffusers-legacy": (detect_diffusers_legacy, _legacy_split, DIFFUSERS_LEGACY),
    "comfy": (detect_comfy, COMFY.split, COMFY),
}


def available_formats() -> list[str]:
    return list(FORMATS)


def detect_format(keys: list[str], *, source: str = "file") -> str:
    """Name of the LoRA format every key of the file follows.

    Raises:
        UnknownFormatError: no format parses every key (names the first key each family fails on).
    """
    if not keys:
        raise UnknownFormatError(f"'{source}' holds no tensors.")
    for name, (detect, _, _) in FORMATS.items():
        if detect(keys):
            return name
    best, leftover = _closest_format(keys)
    if best is None:
        hint = _checkpoint_hint(keys)
        raise UnknownFormatError(f"'{source}' is not a LoRA in any known format (first key: {keys[0]}){hint}.")
    raise UnknownFormatError(
        f"'{source}' looks like a {best} LoRA but {len(leftover)} keys do not fit that format (first: {leftover[0]})."
    )


def _closest_format(keys: list[str]) -> tuple[str | None, list[str]]:
    best, best_left = None, keys
    for name, (_, split, _) in FORMATS.items():
        left = [k for k in keys if split(k) is None]
        if len(left) < len(best_left):
            best, best_left = name, left
    return best, best_left


def _checkpoint_hint(keys: list[str]) -> str:
    if any(k.startswith(("model.diffusion_model.", "conditioner.", "first_stage_model.")) for k in keys):
        return ": it looks like a full checkpoint, not a LoRA"
    if any(k.startswith(("down_blocks.", "mid_block.", "conv_in.")) for k in keys):
        return ": it looks like a diffusers UNet, not a LoRA"
    return ""


def load_lora(path: str | Path, *, source: TensorSource | None = None) -> LoraAdapter:
    """Read a LoRA file (headers only) into a :class:`LoraAdapter`.

    Example:
        >>> with load_lora("sdxl_lightning_4step_lora.safetensors") as lora:
        ...     print(lora.format, len(lora.modules))
    """
    src = source or open_source(path)
    try:
        keys = src.keys()
        fmt = detect_format(keys, source=str(path))
        _, split, _ = FORMATS[fmt]
        groups: dict[tuple[Component, str], dict[str, str]] = {}
        for k in keys:
            parsed = split(k)
            assert parsed is not None
            component, module, role = parsed
            roles = groups.setdefault((component, module), {})
            if role in roles:
                raise InvalidFileError(f"'{path}' has two '{role}' tensors for module '{module}' ({roles[role]}, {k}).")
            roles[role] = k
        peft_alphas = _peft_alphas(src.metadata) if fmt in ("peft", "peft-raw") else {}
        modules = [_build_module(src, c, m, roles, peft_alphas, str(path)) for (c, m), roles in groups.items()]
    except BaseException:
        src.close()
        raise
    return LoraAdapter(Path(path), fmt, modules, dict(src.metadata), src)  # type: ignore[arg-type]


def _build_module(src: TensorSource, component: Component, name: str, roles: dict[str, str],
                  peft_alphas: dict[str, object], path: str) -> AdapterModule:
    kind = _kind_of(roles, name, path)
    tensor_roles = {r: k for r, k in roles.items() if r != "alpha"}
    alpha: float | None = src.scalar(roles["alpha"]) if "alpha" in roles else None
    if alpha is None and peft_alphas:
        alpha = _peft_alpha_for(peft_alphas, component, name)
    return AdapterModule(component, name, kind, tensor_roles, alpha, _rank_of(src, kind, tensor_roles))


def _kind_of(roles: dict[str, str], name: str, path: str) -> AdapterKind:
    present = set(roles) - {"alpha", "dora_scale"}
    if present & {"down", "up", "mid"}:
        kind: AdapterKind = "lora"
        need = {"down", "up"}
    elif present & {"w1", "w2"} or ("w1a" in present and "t1" not in present and "w2a" not in present):
        kind, need = "lokr", set()
    elif present & {"w1a", "w1b", "w2a", "w2b", "t1", "t2"}:
        kind, need = ("loha", {"w1a", "w1b", "w2a", "w2b"})
    elif "diff" in present:
        kind, need = "full", {"diff"}
    else:
        raise InvalidFileError(f"'{path}': module '{name}' has only {sorted(roles)}, no weights to apply.")
    if kind == "lokr":
        has1 = "w1" in present or {"w1a", "w1b"} <= present
        has2 = "w2" in present or {"w2a", "w2b"} <= present
        if not (has1 and has2):
            raise InvalidFileError(f"'{path}': LoKr module '{name}' lacks a factor (has {sorted(present)}).")
    missing = need - present
    if missing:
        raise InvalidFileError(f"'{path}': module '{name}' has {sorted(present)} but no {sorted(missing)[0]}.")
    return kind


def _rank_of(src: TensorSource, kind: AdapterKind, roles: dict[str, str]) -> int:
    if kind == "lora":
        return src.meta(roles["down"]).shape[0]
    if kind == "loha":
        return src.meta(roles["w1b"]).shape[0]
    if kind == "lokr":
        if "w1b" in roles:
            return src.meta(roles["w1b"]).shape[0]
        if "w2b" in roles:
            return src.meta(roles["w2b"]).shape[0]
    return 0


def _peft_alphas(metadata: Mapping[str, str]) -> dict[str, object]:
    """The ``lora_adapter_metadata`` JSON diffusers writes (keys like ``unet.lora_alpha``)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


_PEFT_COMPONENT = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}


def _peft_alpha_for(meta: dict[str, object], component: Component, module: str) -> float | None:
    prefix = _PEFT_COMPONENT[component]
    pattern = meta.get(f"{prefix}.alpha_pattern") or {}
    if isinstance(pattern, dict):
        for pat, value in pattern.items():  # PEFT's rule: the pattern matches a suffix of the module name
            if re.match(rf"(.*\.)?({pat})$", module):
                return float(value)
    alpha = meta.get(f"{prefix}.lora_alpha")
    return float(alpha) if isinstance(alpha, (int, float)) else None


__all__ = ["available_formats", "detect_format", "load_lora", "FORMATS", "SafetensorsSource", "StateDictSource"]
