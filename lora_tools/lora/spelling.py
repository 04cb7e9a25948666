"""The two independent parts of a LoRA key: the naming family and the factor spelling.

A key is ``<envelope><module name><sep><factor suffix>``. The *naming family* fixes the envelopes
(``lora_unet_``, ``unet.``, ``diffusion_model.``...), which component each names, whether module
names use ``_`` or ``.``, and which module vocabulary they use (SGM ``input_blocks`` or diffusers
``down_blocks``). The *factor spelling* fixes the suffix of each factor role (``lora_up.weight``,
``lora_B.weight``, ``lora.up.weight``...). Every spelling parses under every naming family, as in
ComfyUI's loader (``comfy/lora.py``); tables are written from the formats' definitions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from lora_tools.layouts.table import Component

Vocabulary = Literal["sgm", "diffusers"]


@dataclass(frozen=True)
class Spelling:
    """How one trainer spells factor roles: suffix -> role (``alpha`` included)."""

    name: str
    suffixes: Mapping[str, str]

    def suffix(self, role: str) -> str | None:
        """The suffix of ``role``, or ``None`` when this spelling has none."""
        return _INVERSE[self.name].get(role)


_LYCORIS = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha",
    "dora_scale": "dora_scale",
    "hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b", "hada_t1": "t1", "hada_t2": "t2",
    "lokr_w1": "w1", "lokr_w1_a": "w1a", "lokr_w1_b": "w1b", "lokr_w2": "w2", "lokr_w2_a": "w2a", "lokr_w2_b": "w2b",
    "lokr_t2": "t2", "diff": "diff", "diff_b": "diff_b",
    # LyCORIS' norm module (LayerNorm/GroupNorm): ComfyUI applies ``w_norm``/``b_norm`` exactly as
    # ``diff``/``diff_b`` (a dense difference on the weight and on the bias beside it).
    "w_norm": "diff", "b_norm": "diff_b",
}

#: Every factor spelling we read; the first one a role appears in is how it is written.
SPELLINGS: dict[str, Spelling] = {s.name: s for s in (
    Spelling("kohya", _LYCORIS),
    Spelling("peft", {"lora_A.weight": "down", "lora_B.weight": "up", "lora_magnitude_vector": "dora_scale",
                      "alpha": "alpha"}),
    Spelling("peft-default", {"lora_A.default.weight": "down", "lora_B.default.weight": "up",
                              "lora_magnitude_vector.default.weight": "dora_scale", "alpha": "alpha"}),
    # Mochi's trainer (ComfyUI reads it for every model): PEFT's names without ".weight".
    Spelling("peft-bare", {"lora_A": "down", "lora_B": "up", "alpha": "alpha"}),
    Spelling("legacy-lora", {"lora.down.weight": "down", "lora.up.weight": "up", "alpha": "alpha"}),
    Spelling("legacy-linear", {"lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up",
                               "alpha": "alpha"}),
    Spelling("legacy-underscore", {"_lora.down.weight": "down", "_lora.up.weight": "up", "_lora.alpha": "alpha"}),
)}
_INVERSE: dict[str, dict[str, str]] = {}
for _s in SPELLINGS.values():
    inv: dict[str, str] = {}
    for _suffix, _role in _s.suffixes.items():
        inv.setdefault(_role, _suffix)
    _INVERSE[_s.name] = inv

#: diffusers' attention-processor spelling: ``<attn>.processor.to_q_lora.down.weight``; its alpha is read as
#: ``<attn>.processor.to_q.alpha`` (where ComfyUI's ``load_lora`` reads it: ``<its module name>.alpha``, and
#: where we write it) or ``<attn>.processor.to_q_lora.alpha``; a DoRA magnitude as ``<attn>.processor.to_q.dora_scale``
#: (ComfyUI's ``<its module name>.dora_scale``).
_PROCESSOR = re.compile(r"^(?P<stem>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)"
                        r"(?:_lora\.(?P<suffix>down\.weight|up\.weight|alpha)|\.(?P<plain>alpha|dora_scale))$")
_PROCESSOR_ROLE = {"down.weight": "down", "up.weight": "up", "alpha": "alpha"}
PROCESSOR = "legacy-processor"


@dataclass(frozen=True)
class Naming:
    """One naming family: envelopes per component, separator, module vocabulary.

    Attributes:
        name: the family's (and its format's) name.
        envelopes: every prefix read, longest first, each with the component it names.
        write: the envelope written for each component (absent: the family cannot hold it).
        underscored: module names use ``_`` (kohya) rather than ``.``.
        vocabulary: ``sgm`` or ``diffusers`` UNet module names (text encoders always use
            the transformers names).
    """

    name: str
    envelopes: tuple[tuple[str, Component], ...]
    write: Mapping[Component, str]
    underscored: bool
    vocabulary: Vocabulary


#: ``lora_prior_te_`` is ComfyUI's name for OpenCLIP-bigG where it is the "prior" text encoder (Stable
#: Cascade; on SDXL ComfyUI maps ``lora_prior_te_text_projection`` to clip_g's text_projection).
_KOHYA_ENVELOPES: tuple[tuple[str, Component], ...] = (
    ("lora_unet_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te_", "te1"), ("lycoris_", "unet"),
    ("lora_prior_te_", "te2"),
)
_KOHYA_WRITE: dict[Component, str] = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_"}
_DIFFUSERS_ENVELOPES: tuple[tuple[str, Component], ...] = (
    ("text_encoder_2.", "te2"), ("text_encoder.", "te1"), ("unet.", "unet"),
)

NAMINGS: dict[str, Naming] = {n.name: n for n in (
    Naming("kohya", _KOHYA_ENVELOPES, _KOHYA_WRITE, True, "sgm"),
    Naming("kohya-diffusers", _KOHYA_ENVELOPES, _KOHYA_WRITE, True, "diffusers"),
    Naming("diffusers", _DIFFUSERS_ENVELOPES, {"unet": "unet.", "te1": "text_encoder.", "te2": "text_encoder_2."},
           False, "diffusers"),
    Naming("peft", (("unet.base_model.model.", "unet"), ("base_model.model.", "unet")), {"unet": "base_model.model."},
           False, "diffusers"),
    Naming("comfy", (("diffusion_model.", "unet"), ("text_encoders.clip_l.transformer.", "te1"),
                     ("text_encoders.clip_g.transformer.", "te2")),
           {"unet": "diffusion_model.", "te1": "text_encoders.clip_l.transformer.",
            "te2": "text_encoders.clip_g.transformer."}, False, "sgm"),
)}

#: First tokens of diffusers UNet module names (how kohya-diffusers is told from kohya).
_DIFFUSERS_UNET_ROOTS = ("down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "conv_norm_out",
                         "time_embedding", "add_embedding")


#: How keys of diffusers' old ``unet.save_attn_procs()`` files begin (UNet module names without envelope;
#: ComfyUI maps them too).
_BARE_UNET_ROOTS = tuple(f"{r}." for r in _DIFFUSERS_UNET_ROOTS)


@dataclass(frozen=True, slots=True)
class ParsedKey:
    """One key split into its parts."""

    component: Component
    envelope: str
    module: str
    role: str
    naming: str
    spelling: str


def _all_envelopes() -> list[tuple[str, Component, str]]:
    seen: dict[str, tuple[str, Component, str]] = {}
    for n in NAMINGS.values():
        for env, comp in n.envelopes:
            family = "kohya" if n.name == "kohya-diffusers" else n.name
            seen.setdefault(env, (env, comp, family))
    return sorted(seen.values(), key=lambda e: -len(e[0]))


_ENVELOPES = _all_envelopes()


def parse_key(key: str) -> ParsedKey | None:
    """Split a key under every naming family and every spelling; ``None`` if none fits."""
    for env, comp, family in _ENVELOPES:
        if not key.startswith(env):
            continue
        rest = key[len(env):]
        underscored = NAMINGS[family].underscored
        hit = _split_rest(rest, underscored)
        if hit is None:
            return None
        module, role, spelling = hit
        naming = family
        if family == "kohya" and comp == "unet" and module.startswith(_DIFFUSERS_UNET_ROOTS):
            naming = "kohya-diffusers"
        return ParsedKey(comp, env, module, role, naming, spelling)
    if key.startswith(_BARE_UNET_ROOTS):  # diffusers' unet.save_attn_procs(): UNet names, no envelope
        hit = _split_rest(key, False)
        if hit is not None:
            return ParsedKey("unet", "", hit[0], hit[1], "diffusers", hit[2])
    return None


def _split_rest(rest: str, underscored: bool) -> tuple[str, str, str] | None:
    if not underscored:
        m = _PROCESSOR.match(rest)
        if m:
            proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
            return f"{m['stem']}.{proj}", m["plain"] or _PROCESSOR_ROLE[m["suffix"]], PROCESSOR
    best: tuple[str, str, str] | None = None
    best_len = -1
    for sp in SPELLINGS.values():
        for suffix, role in sp.suffixes.items():
            if underscored:
                # kohya names hold no ".": the module ends at the first one. The legacy
                # "_lora" spelling is dotted-only.
                module, dot, tail = rest.partition(".")
                ok = bool(dot) and tail == suffix and bool(module) and sp.name != "legacy-underscore"
            elif suffix.startswith("_"):
                ok = rest.endswith(suffix) and len(rest) > len(suffix)
                module = rest[: -len(suffix)]
            else:
                ok = rest.endswith("." + suffix) and len(rest) > len(suffix) + 1
                module = rest[: -len(suffix) - 1]
            if ok and len(suffix) > best_len:
                best, best_len = (module, role, sp.name), len(suffix)
    return best


def spelling_suffix(spelling: str, role: str, module: str = "") -> str | None:
    """The suffix ``spelling`` gives ``role`` (``None`` when it has none)."""
    if spelling == PROCESSOR:
        return {"down": "down.weight", "up": "up.weight", "alpha": "alpha"}.get(role)
    return SPELLINGS[spelling].suffix(role)


#: LoKr's factor names: its ``w1a``/``w1b``/``w2a``/``w2b``/``t2`` roles share their names with LoHa's,
#: so a role alone does not say which LyCORIS spelling it has.
_LOKR_SUFFIXES = {"w1": "lokr_w1", "w1a": "lokr_w1_a", "w1b": "lokr_w1_b", "w2": "lokr_w2", "w2a": "lokr_w2_a",
                  "w2b": "lokr_w2_b", "t2": "lokr_t2"}


def spell_key(envelope: str, module: str, role: str, spelling: str, kind: str = "lora") -> str | None:
    """The key of ``role`` of ``module`` under ``envelope`` in ``spelling`` (``None``: not spellable);
    ``kind`` is the module's algorithm (``lokr`` roles are spelled ``lokr_*``, LoHa's ``hada_*``)."""
    if kind == "lokr" and spelling == "kohya" and role in _LOKR_SUFFIXES:
        return f"{envelope}{module}.{_LOKR_SUFFIXES[role]}"
    if spelling == PROCESSOR:
        stem, _, proj = module.rpartition(".")
        if proj == "0" and stem.endswith(".to_out"):
            stem, proj = stem[: -len(".to_out")], "to_out"
        if proj not in ("to_q", "to_k", "to_v", "to_out"):
            return None
        if role in ("alpha", "dora_scale"):  # ComfyUI reads "<its module name>.alpha" (.dora_scale) only
            return f"{envelope}{stem}.processor.{proj}.{role}"
        suffix = spelling_suffix(spelling, role)
        if suffix is None:
            return None
        return f"{envelope}{stem}.processor.{proj}_lora.{suffix}"
    suffix = spelling_suffix(spelling, role)
    if suffix is None:
        return None
    sep = "" if suffix.startswith("_") else "."
    return f"{envelope}{module}{sep}{suffix}"


def is_diffusers_unet_name(module: str) -> bool:
    """Whether a UNet module name (dotted or underscored) uses diffusers block names."""
    return module.startswith(_DIFFUSERS_UNET_ROOTS)
