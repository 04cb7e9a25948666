"""LoRA file formats: one :class:`Format` per format (name, description, detect, parse, spell).

A format is a naming family (envelopes, separator, module vocabulary: :mod:`.spelling`) with the
factor spelling it writes and where it keeps alphas. Parsing is two independent parts, so a key
in any factor spelling parses under any naming family; a file is in the format of its naming
family. Parsing is total: a key that fits nothing is an error naming the key, never a silently
dropped tensor. Reading a file is :mod:`.load`; ``load_lora(f).format`` is the format
:func:`~lora_tools.lora.save.save_lora` writes back.

Names: ``kohya`` (sd-scripts SDXL names ``lora_unet_input_blocks_4_1_...``), ``kohya-diffusers``
(the kohya envelope around diffusers module names, as SDXL-Lightning/LCM/DMD2 ship),
``diffusers`` (``unet.``/``text_encoder.`` + ``lora_A``/``lora_B``, alphas in
``lora_adapter_metadata``), ``peft`` (raw ``base_model.model.``), ``comfy``
(``diffusion_model.``), ``diffusers-legacy`` (attention-processor and ``lora.up`` keys). The old
names ``kohya-sgm``, ``peft-raw`` are accepted as aliases (:data:`ALIASES`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lora_tools.errors import Hint, UnknownFormatError
from lora_tools.layouts.table import Component
from lora_tools.lora.spelling import NAMINGS, Naming, ParsedKey, parse_key

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
        if p is None or format_family(p) not in (self.name, _family_of(self.name)):
            return None
        return p.component, p.module, p.role

    def envelope(self, component: Component) -> str | None:
        return self.naming.write.get(component)


def _family_of(name: str) -> str:
    return "diffusers" if name == "diffusers-legacy" else name


def format_family(p: ParsedKey) -> str:
    """The format a parsed key belongs to: its naming family (legacy diffusers keys apart)."""
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
    families = {format_family(p) for p in parsed if not (p.naming.startswith("kohya") and p.component != "unet")}
    if not families:
        families = {format_family(p) for p in parsed}
    if families <= {"kohya", "kohya-diffusers"}:
        return families.pop() if len(families) == 1 else "kohya"
    if families <= {"diffusers", "diffusers-legacy"}:
        # LyCORIS roles have no legacy suffix: a legacy file's LoCon/LoHa keys use kohya's. Only a
        # PEFT-spelled key makes it a current diffusers file.
        spellings = {p.spelling for p in parsed if p.naming == "diffusers"}
        if "diffusers-legacy" in families and not spellings & {"peft", "peft-default", "peft-bare"}:
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


__all__ = ["ALIASES", "FORMATS", "Format", "available_formats", "format_description", "format_family", "format_of_keys",
           "get_format"]
