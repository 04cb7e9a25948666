"""LoRA file formats: one :class:`Format` per format (name, description, detect, parse, spell).

A format is a naming family (envelopes, separator, module vocabulary: :mod:`.spelling`) with the
factor spelling it writes and where it keeps alphas. Parsing is two independent parts, so a key
in any factor spelling parses under any naming family; a file is in the format of its naming
family. Parsing is total: a key that fits nothing is an error naming the key, never a silently
dropped tensor. ``load_lora(f).format`` is the format :func:`~lora_tools.lora.save.save_lora`
writes back.

Names: ``kohya`` (sd-scripts SDXL names ``lora_unet_input_blocks_4_1_...``), ``kohya-diffusers``
(the kohya envelope around diffusers module names, as SDXL-Lightning/LCM/DMD2 ship),
``diffusers`` (``unet.``/``text_encoder.`` + ``lora_A``/``lora_B``, alphas in
``lora_adapter_metadata``), ``peft`` (raw ``base_model.model.``), ``comfy``
(``diffusion_model.``), ``diffusers-legacy`` (attention-processor and ``lora.up`` keys). The old
names ``kohya-sgm``, ``peft-raw`` are accepted as aliases (:data:`ALIASES`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Literal

from lora_tools.errors import Hint, InvalidFileError, UnknownFormatError, UnsupportedModelError
from lora_tools.layouts.table import Component
from lora_tools.lora import peft_meta
from lora_tools.lora.adapter import AdapterModule, LoraAdapter, LoraModule, kind_of, rank_of
from lora_tools.lora.family import flux_message, looks_like_flux
from lora_tools.lora.spelling import NAMINGS, PROCESSOR, Naming, ParsedKey, parse_key
from lora_tools.io.sources import SafetensorsSource, StateDictSource, TensorMeta, TensorSource, open_source

AlphaStore = Literal["tensor", "metadata", "metadata-flat"]


@dataclass(frozen=True)
class Format:
    """One LoRA format.

    Attributes:
        name: the one name used everywhere (inspect's ``format``, ``save_lora(format=...)``).
        description: one line for people.
        naming: the naming family (envelopes, separator, vocabulary).
        spelling: the factor spelling this format writes.
        alphas: where alphas go: ``tensor`` (``<module>.alpha``), ``metadata`` (diffusers'
            per-component ``lora_adapter_metadata``) or ``metadata-flat`` (PEFT's own).
    """

    name: str
    description: str
    naming: Naming
    spelling: str
    alphas: AlphaStore

    def detect(self, keys: list[str]) -> bool:
        """Whether every key parses and names a module of this format's family."""
        if not keys:
            return False
        parsed = [parse_key(k) for k in keys]
        if any(p is None for p in parsed):
            return False
        return format_of_keys([p for p in parsed if p is not None]) == self.name

    def parse(self, key: str) -> tuple[Component, str, str] | None:
        """``(component, module, role)`` of a key of this format, or ``None``."""
        p = parse_key(key)
        if p is None or _format_family(p) not in (self.name, _family_of(self.name)):
            return None
        return p.component, p.module, p.role

    def envelope(self, component: Component) -> str | None:
        return self.naming.write.get(component)

    def __getitem__(self, i: int) -> object:  # the old (detector, splitter, grammar) tuple
        return (self.detect, self.parse, self)[i]


def _family_of(name: str) -> str:
    return "diffusers" if name == "diffusers-legacy" else name


def _format_family(p: ParsedKey) -> str:
    if p.naming == "diffusers" and p.spelling.startswith("legacy"):
        return "diffusers-legacy"
    return p.naming


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("kohya", "kohya/LyCORIS with SGM module names: lora_unet_input_blocks_4_1_... + lora_down/lora_up/alpha "
           "(also LoCon, LoHa, LoKr, DoRA, full diffs)", NAMINGS["kohya"], "kohya", "tensor"),
    Format("kohya-diffusers", "kohya envelope around diffusers module names: lora_unet_down_blocks_1_... "
           "(SDXL-Lightning, LCM, DMD2)", NAMINGS["kohya-diffusers"], "kohya", "tensor"),
    Format("diffusers", "diffusers/PEFT: unet./text_encoder./text_encoder_2. + lora_A/lora_B "
           "(alpha from lora_adapter_metadata)", NAMINGS["diffusers"], "peft", "metadata"),
    Format("peft", "raw PEFT: base_model.model.<module>.lora_A/lora_B (alpha from lora_adapter_metadata)",
           NAMINGS["peft"], "peft", "metadata-flat"),
    Format("comfy", "ComfyUI-saved: diffusion_model.<SGM path>.lora_down/lora_up/alpha, text_encoders.clip_l/clip_g",
           NAMINGS["comfy"], "kohya", "tensor"),
    Format("diffusers-legacy", "old diffusers attention processors: <module>.processor.to_q_lora.down.weight, "
           ".lora.down.weight, .lora_linear_layer.down.weight", NAMINGS["diffusers"], "legacy-lora", "tensor"),
)}
#: Old format names still accepted where a format is passed.
ALIASES = {"kohya-sgm": "kohya", "peft-raw": "peft", "diffusers-peft": "diffusers"}


def available_formats() -> list[str]:
    return list(FORMATS)


def get_format(name: str) -> Format:
    """The :class:`Format` called ``name`` (or an old alias).

    Raises:
        UnknownFormatError: no such format.
    """
    fmt = FORMATS.get(ALIASES.get(name, name))
    if fmt is None:
        raise UnknownFormatError(f"unknown LoRA format '{name}' (known: {', '.join(FORMATS)}).",
                                 hint=Hint("format", "with one of those names", "NAME"))
    return fmt


def format_description(name: str) -> str:
    return get_format(name).description


def format_of_keys(parsed: list[ParsedKey]) -> str:
    """The format of a set of parsed keys: their naming family (kohya with SGM and diffusers
    UNet names mixed is ``kohya``; text-encoder-only kohya files are ``kohya``). ``alpha`` keys,
    spelled alike everywhere, do not vote."""
    parsed = [p for p in parsed if p.role != "alpha"] or parsed
    families = {_format_family(p) for p in parsed if not (p.naming.startswith("kohya") and p.component != "unet")}
    if not families:
        families = {_format_family(p) for p in parsed}
    if families <= {"kohya", "kohya-diffusers"}:
        return families.pop() if len(families) == 1 else "kohya"
    if families <= {"diffusers", "diffusers-legacy"}:
        # LyCORIS roles have no legacy suffix: a legacy file's LoCon/LoHa keys use kohya's. Only a
        # PEFT-spelled key makes it a current diffusers file.
        spellings = {p.spelling for p in parsed if p.naming == "diffusers"}
        if "diffusers-legacy" in families and not spellings & {"peft", "peft-default"}:
            return "diffusers-legacy"
        return "diffusers"
    return sorted(families)[0] if len(families) == 1 else "mixed"


# Detectors by name, kept for callers of the old API.
def detect_kohya(keys: list[str]) -> bool:
    return FORMATS["kohya"].detect(keys) or FORMATS["kohya-diffusers"].detect(keys)


def detect_comfy(keys: list[str]) -> bool:
    return FORMATS["comfy"].detect(keys)


def detect_peft(keys: list[str]) -> bool:
    return FORMATS["diffusers"].detect(keys)


def detect_peft_raw(keys: list[str]) -> bool:
    return FORMATS["peft"].detect(keys)


def detect_diffusers_legacy(keys: list[str]) -> bool:
    return FORMATS["diffusers-legacy"].detect(keys)


def detect_format(keys: list[str], *, source: str = "file") -> str:
    """Name of the LoRA format of a file whose every key parses.

    Raises:
        UnknownFormatError: some key fits no naming family and spelling (names the first), or
            the keys mix naming families.
        UnsupportedModelError: the keys name another model family's blocks (Flux).
    """
    if not keys:
        raise UnknownFormatError(f"'{source}' holds no tensors.")
    if looks_like_flux(keys):
        raise UnsupportedModelError(flux_message(source, keys))
    parsed = [parse_key(k) for k in keys]
    left = [k for k, p in zip(keys, parsed) if p is None]
    if not left:
        fmt = format_of_keys([p for p in parsed if p is not None])
        if fmt != "mixed":
            return fmt
        fams = sorted({_format_family(p) for p in parsed if p is not None})
        raise UnknownFormatError(f"'{source}' mixes LoRA naming families ({', '.join(fams)}); "
                                 "split it into one file per family.")
    ok = [p for p in parsed if p is not None]
    if not ok:
        hint = _checkpoint_hint(keys)
        raise UnknownFormatError(f"'{source}' is not a LoRA in any known format (first key: {keys[0]}){hint}.")
    best = format_of_keys(ok)
    if best == "mixed":
        best = _format_family(ok[0])
    raise UnknownFormatError(
        f"'{source}' looks like a {best} LoRA but {len(left)} keys do not fit that format (first: {left[0]})."
    )


def _checkpoint_hint(keys: list[str]) -> str:
    if any(k.startswith(("model.diffusion_model.", "conditioner.", "first_stage_model.")) for k in keys):
        return ": it looks like a full checkpoint, not a LoRA"
    if any(k.startswith(("down_blocks.", "mid_block.", "conv_in.")) for k in keys):
        return ": it looks like a diffusers UNet, not a LoRA"
    return ""


def load_lora(path: str | Path, *, source: TensorSource | None = None) -> LoraAdapter:
    """Read a LoRA file (headers and alphas only) into a :class:`LoraAdapter`.

    Args:
        path: a ``.safetensors`` LoRA (or a legacy pickle, read with ``weights_only=True``).
        source: an already open source of ``path`` (inspect shares its own).

    Raises:
        UnknownFormatError: the keys fit no format.
        InvalidFileError: a module's keys do not make a LoRA module.

    Example:
        >>> with load_lora("sdxl_lightning_4step_lora.safetensors") as lora:
        ...     print(lora.format, len(lora.modules))
        kohya-diffusers 788
    """
    src = source or open_source(path)
    try:
        keys = src.keys()
        fmt = detect_format(keys, source=str(path))
        groups: dict[tuple[Component, str], dict[str, tuple[str, ParsedKey]]] = {}
        for k in keys:
            p = parse_key(k)
            assert p is not None
            roles = groups.setdefault((p.component, p.module), {})
            if p.role in roles:
                raise InvalidFileError(
                    f"'{path}' has two '{p.role}' tensors for module '{p.module}' ({roles[p.role][0]}, {k}).")
            roles[p.role] = (k, p)
        peft_data = peft_meta.parse(src.metadata) if FORMATS.get(fmt, FORMATS["kohya"]).alphas != "tensor" else {}
        modules = [_build_module(src, c, m, roles, peft_data, str(path)) for (c, m), roles in groups.items()]
        if fmt in ("kohya", "kohya-diffusers"):  # text-encoder names are the same in both families
            modules = [replace(m, naming=fmt) if m.component != "unet" else m for m in modules]
    except BaseException:
        src.close()
        raise
    return LoraAdapter(Path(path), fmt, modules, dict(src.metadata), src)  # type: ignore[arg-type]


_SHARED_ROLES = ("alpha", "diff_b", "dora_scale")


def _build_module(src: TensorSource, component: Component, name: str, roles: dict[str, tuple[str, ParsedKey]],
                  peft_data: dict[str, object], path: str) -> LoraModule:
    kind = kind_of(roles, name, path)
    keys = {r: k for r, (k, _) in roles.items() if r != "alpha"}
    factor_parts = [p for r, (_, p) in roles.items() if r != "alpha"] or [p for _, p in roles.values()]
    first = factor_parts[0]
    # ``.diff_b`` and ``.dora_scale`` are spelled alike beside every factor spelling (ComfyUI reads them
    # by those names whatever the weight's keys): they do not vote on the module's spelling.
    voters = [p for r, (_, p) in roles.items() if r not in _SHARED_ROLES] or factor_parts
    spellings = {p.spelling for p in voters}
    spelling = spellings.pop() if len(spellings) == 1 else "mixed"
    rank = rank_of(src, kind, keys)  # type: ignore[arg-type]
    alpha: float | None = None
    alpha_meta: TensorMeta | None = None
    if "alpha" in roles:
        alpha_key = roles["alpha"][0]
        alpha = src.scalar(alpha_key)
        alpha_meta = src.meta(alpha_key)
    elif peft_data:
        alpha = peft_meta.alpha_for(peft_data, component, name, rank)
    return LoraModule(component, name, kind, keys, alpha, rank, src, naming=first.naming,  # type: ignore[arg-type]
                      spelling=spelling, envelope=first.envelope, alpha_meta=alpha_meta)


__all__ = ["ALIASES", "FORMATS", "AdapterModule", "Format", "SafetensorsSource", "StateDictSource",
           "available_formats", "detect_format", "format_description", "get_format", "load_lora"]
