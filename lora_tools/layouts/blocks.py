"""ONE block scheme for SDXL: every tensor of the model belongs to exactly one named block.

The names are the ones people already type for SDXL block weights (supermerger, LoRA Block
Weight, kohya ``--lbws``), in model order (:data:`BLOCKS`):

=========== ============================================ =========================================
block       single-file (SGM) keys                       diffusers modules
=========== ============================================ =========================================
``TIME``    ``time_embed.*``                             ``time_embedding.*``
``LABEL``   ``label_emb.*``                              ``add_embedding.*``
``IN00``    ``input_blocks.0.*`` (``conv_in``)           ``conv_in``
``IN01``-   ``input_blocks.1``-``8.*``                   ``down_blocks.i.{resnets,attentions}.j``
``IN08``                                                 (``IN{3i+j+1}``), ``down_blocks.i.downsamplers``
                                                         (``IN{3i+3}``)
``M00``     ``middle_block.{0,1,2}.*``                   ``mid_block.*``
``OUT00``-  ``output_blocks.0``-``8.*``                  ``up_blocks.i.{resnets,attentions}.j``
``OUT08``                                                (``OUT{3i+j}``), ``up_blocks.i.upsamplers``
                                                         (``OUT{3i+2}``)
``OUT``     ``out.*`` (final GroupNorm and conv)         ``conv_norm_out``, ``conv_out``
``TE1``     ``conditioner.embedders.0.*`` (CLIP-L)       ``text_encoder/*``
``TE2``     ``conditioner.embedders.1.*`` (OpenCLIP-G)   ``text_encoder_2/*``
``VAE``     ``first_stage_model.*``                      ``vae/*``
=========== ============================================ =========================================

How the names relate to the peers:

- ComfyUI ``ModelMergeSDXL`` (``comfy_extras/nodes_model_merging_model_specific.py``) has one
  ratio per key prefix: ``time_embed.``, ``label_emb.``, ``input_blocks.0``-``8``,
  ``middle_block.0``-``2``, ``output_blocks.0``-``8``, ``out.``. ``TIME``/``LABEL``/``INnn``/
  ``OUTnn``/``OUT`` are those prefixes one for one; ComfyUI's three ``middle_block.N`` ratios are
  our one ``M00`` (the middle block's resnet, attention and resnet). Its node has no text-encoder
  or VAE ratio.
- supermerger's SDXL block IDs are ``BASE, IN00-IN08, M00, OUT00-OUT08`` (20 weights); our
  ``INnn``/``M00``/``OUTnn`` are the same blocks. supermerger's ``BASE`` is the text encoders,
  which we split into ``TE1`` and ``TE2``; ``BASE`` is accepted in a spec as an alias for both.
  supermerger and merge-block-weighted fold ``time_embed``/``out`` into neighbouring weights; we
  name them (``TIME``, ``LABEL``, ``OUT``) so they can be set on their own. LoRA Block Weight's
  12-weight SDXL preset names the attention blocks ``IN04 IN05 IN07 IN08 MID OUT00``-``OUT05``;
  ``MID`` is accepted as an alias of ``M00``. A spec of 12 or 20 bare numbers is read as such a
  vector (:data:`LBW_VECTORS`); SD1.x's 17 and 26 and LoRA Block Weight's preset names are refused.

Per-block weights are written as a spec, parsed by :func:`parse_block_weights`::

    "IN04-IN08:0.5,M00:0,OUT*:1"

Entries are ``PATTERN:WEIGHT`` separated by commas. A pattern is a block name, a range of
blocks in model order (``IN04-IN08``), a glob (``OUT*``, ``IN0?``, ``*``) or an alias (``BASE``,
``MID``); a bare number sets the weight of every block. Entries apply from left to right, the
later one winning; blocks no entry names keep the ``default``.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from lora_tools.errors import KeyMismatchError, UsageError
from lora_tools.layouts.table import SGM_PREFIXES, Component

if TYPE_CHECKING:
    from lora_tools.layouts.sdxl import LayoutTable

#: SDXL's input and output blocks (``layers_per_block`` 2 and a down/up sampler per level, 3 levels).
N_IN = N_OUT = 9
#: Every block, in model order.
BLOCKS: tuple[str, ...] = (
    ("TIME", "LABEL")
    + tuple(f"IN{i:02d}" for i in range(N_IN))
    + ("M00",)
    + tuple(f"OUT{i:02d}" for i in range(N_OUT))
    + ("OUT", "TE1", "TE2", "VAE")
)
#: Names other tools use for a group of our blocks (see the module docstring).
ALIASES: Mapping[str, tuple[str, ...]] = MappingProxyType({"BASE": ("TE1", "TE2"), "MID": ("M00",)})
_ORDER = {b: i for i, b in enumerate(BLOCKS)}
_WHOLE = {"te1": "TE1", "te2": "TE2", "vae": "VAE"}
_UNET_NAMED = {"time_embed": "TIME", "label_emb": "LABEL", "middle_block": "M00", "out": "OUT"}


def block_of(component: Component, sgm_key: str) -> str:
    """The block a single-file (SGM) key belongs to.

    Args:
        component (`str`): ``unet``, ``te1``, ``te2`` or ``vae``.
        sgm_key (`str`): the key inside the component (``input_blocks.4.1.proj_in.weight``) or the
            full single-file key (``model.diffusion_model.input_blocks.4.1.proj_in.weight``); a
            module name (no ``.weight``) works too.

    Returns:
        `str`: one of :data:`BLOCKS`.

    Raises:
        [`KeyMismatchError`]: the key is not in SDXL's block structure (``input_blocks.11``).
    """
    if component in _WHOLE:
        return _WHOLE[component]
    prefix = SGM_PREFIXES["unet"]
    key = sgm_key[len(prefix):] if sgm_key.startswith(prefix) else sgm_key
    parts = key.split(".")
    if parts[0] in _UNET_NAMED:
        return _UNET_NAMED[parts[0]]
    if parts[0] in ("input_blocks", "output_blocks") and len(parts) > 1 and parts[1].isdigit():
        n, limit = int(parts[1]), N_IN if parts[0] == "input_blocks" else N_OUT
        if n < limit:
            return f"{'IN' if parts[0] == 'input_blocks' else 'OUT'}{n:02d}"
    raise KeyMismatchError(f"'{sgm_key}' is not in any SDXL UNet block (SDXL has input_blocks.0-8, "
                           f"middle_block, output_blocks.0-8, time_embed, label_emb and out).")


def block_of_key(key: str) -> str:
    """The block of a full single-file key, its component read from the prefix.

    Raises:
        [`KeyMismatchError`]: the key has no SDXL component prefix or is outside the UNet blocks.
    """
    for component, prefix in SGM_PREFIXES.items():
        if key.startswith(prefix):
            return block_of(component, key[len(prefix):])
    raise KeyMismatchError(f"'{key}' has no SDXL component prefix ({', '.join(SGM_PREFIXES.values())}).")


def block_of_diffusers(component: Component, key: str, table: LayoutTable | None = None) -> str:
    """The block of a diffusers key (``down_blocks.1.attentions.0.proj_in.weight``) or module name.

    The key is translated to its single-file key through the layout ``table`` (full-size SDXL
    by default), so the rule is the structure's, not a second set of patterns. A kohya or PEFT
    module name resolves the same way through ``TargetIndex.lookup(component, name).sgm_key``.

    Raises:
        [`KeyMismatchError`]: the key is not in the layout table.
    """
    if component in _WHOLE:
        return _WHOLE[component]
    if table is None:
        from lora_tools.layouts.sdxl import FULL

        table = FULL.table
    for candidate in (key, key + ".weight"):
        row = table.by_diffusers.get((component, candidate))
        if row is not None:
            return block_of(component, row.sgm)
    raise KeyMismatchError(f"'{key}' is not a diffusers {component} key of the SDXL layout.")


class BlockSpecError(UsageError):
    """A per-block weight spec that cannot be parsed; the message names the bad entry."""


@dataclass(frozen=True)
class BlockWeights:
    """A weight for every block, parsed from a spec by :func:`parse_block_weights`.

    Attributes:
        spec: the spec as given.
        default: the weight of blocks no entry names.
        weights: block -> weight for every block of :data:`BLOCKS`.
        explicit: the blocks some entry of the spec names.
    """

    spec: str
    default: float
    weights: Mapping[str, float] = field(repr=False)
    explicit: frozenset[str] = frozenset()

    def weight(self, block: str) -> float:
        """The weight of ``block`` (one of :data:`BLOCKS`)."""
        try:
            return self.weights[block]
        except KeyError:
            raise KeyMismatchError(f"'{block}' is not an SDXL block ({_nearest(block)}).") from None

    def matches(self, block: str) -> bool:
        """Whether an entry of the spec names ``block`` (else it has the default)."""
        return block in self.explicit

    def weight_of(self, component: Component, sgm_key: str) -> float:
        """The weight of the block a single-file key belongs to (see :func:`block_of`)."""
        return self.weights[block_of(component, sgm_key)]

    def describe(self) -> str:
        """Runs of equal weights in model order: ``TIME-IN03 1, IN04-IN08 0.5, M00 0, ...``."""
        runs: list[tuple[str, str, float]] = []
        for b in BLOCKS:
            w = self.weights[b]
            if runs and runs[-1][2] == w:
                runs[-1] = (runs[-1][0], b, w)
            else:
                runs.append((b, b, w))
        return ", ".join(f"{a if a == z else a + '-' + z} {w:g}" for a, z, w in runs)


def parse_block_weights(spec: str, *, default: float = 1.0) -> BlockWeights:
    """Parse a per-block weight spec such as ``"IN04-IN08:0.5,M00:0,OUT*:1"``.

    Args:
        spec (`str`): comma-separated ``PATTERN:WEIGHT`` entries (see the module docstring); a
            bare number sets every block.
        default (`float`, *optional*, defaults to 1.0): the weight of blocks no entry names.

    Returns:
        `BlockWeights`: a weight for every block.

    Raises:
        [`BlockSpecError`]: an empty spec or entry, an unknown block (the message suggests the
            nearest valid one), a reversed range, a glob that matches no block, or a weight that
            is not a finite number.

    Example:
        ```py
        >>> bw = parse_block_weights("IN04-IN08:0.5,M00:0,OUT*:1", default=0)
        >>> bw.weight("IN05"), bw.weight("M00"), bw.weight("OUT03"), bw.weight("TE1")
        (0.5, 0.0, 1.0, 0)
        ```
    """
    if not spec or not spec.strip():
        raise BlockSpecError("Empty block-weight spec: give PATTERN:WEIGHT entries.")
    weights = {b: default for b in BLOCKS}
    explicit: set[str] = set()
    vector = _lbw_vector(spec)
    if vector is not None:
        for name, w in vector:
            for b in ALIASES.get(name, (name,)):
                weights[b] = w
                explicit.add(b)
        return BlockWeights(spec, default, MappingProxyType(weights), frozenset(explicit))
    for raw in spec.split(","):
        entry = raw.strip()
        if not entry:
            raise BlockSpecError(f"Empty entry in block-weight spec '{spec}'.")
        pattern, sep, value = entry.rpartition(":")
        if entry.upper() in LBW_PRESETS or pattern.strip().upper() in LBW_PRESETS:
            raise BlockSpecError(f"'{entry}' is a LoRA Block Weight preset name, which differ between installs: give "
                                 "its numbers (12 or 20 for SDXL) or PATTERN:WEIGHT entries such as 'IN*:1,M00:0'.")
        if not sep:
            pattern, value = "*", entry
        blocks = _expand(pattern.strip(), entry)
        w = _weight(value.strip(), entry)
        for b in blocks:
            weights[b] = w
            explicit.add(b)
    return BlockWeights(spec, default, MappingProxyType(weights), frozenset(explicit))


#: A1111 "LoRA Block Weight" vectors for SDXL, by length: which of our blocks each number weighs
#: (``BASE``: both text encoders). Blocks a vector does not name keep the default weight.
LBW_VECTORS: Mapping[int, tuple[str, ...]] = MappingProxyType({
    12: ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(6))),
    20: ("BASE", *(f"IN{i:02d}" for i in range(N_IN)), "M00", *(f"OUT{i:02d}" for i in range(N_OUT))),
})
#: Vector lengths of SD1.x block weights (17: LoRA Block Weight, 26: every block), refused for SDXL.
SD15_VECTOR_LENGTHS = (17, 26)
#: LoRA Block Weight's preset names (their numbers are user-editable, so we do not guess them).
LBW_PRESETS = frozenset({"NONE", "ALL", "INS", "IND", "INALL", "MIDD", "OUTD", "OUTS", "OUTALL", "ALL0.5"})


def _lbw_vector(spec: str) -> list[tuple[str, float]] | None:
    """A spec of bare numbers only (more than one) as a LoRA Block Weight vector, or ``None``."""
    entries = [e.strip() for e in spec.split(",")]
    if len(entries) < 2 or any(":" in e or not e for e in entries):
        return None
    try:
        values = [float(e) for e in entries]
    except ValueError:
        return None
    n = len(values)
    if n in SD15_VECTOR_LENGTHS:
        raise BlockSpecError(f"'{spec}' has {n} numbers, a LoRA Block Weight vector for SD1.x; an SDXL vector has "
                             "12 (BASE,IN04,IN05,IN07,IN08,MID,OUT00-OUT05) or 20 (BASE,IN00-IN08,MID,OUT00-OUT08).")
    if n not in LBW_VECTORS:
        raise BlockSpecError(f"'{spec}' has {n} bare numbers: a LoRA Block Weight vector for SDXL has 12 "
                             "(BASE,IN04,IN05,IN07,IN08,MID,OUT00-OUT05) or 20 (BASE,IN00-IN08,MID,OUT00-OUT08); "
                             "one bare number sets every block; or give PATTERN:WEIGHT entries.")
    for e, v in zip(entries, values, strict=True):
        if not math.isfinite(v):
            raise BlockSpecError(f"Weight '{e}' in '{spec}' is not finite.")
    return list(zip(LBW_VECTORS[n], values, strict=True))


def _expand(pattern: str, entry: str) -> tuple[str, ...]:
    name = pattern.upper()
    if not name:
        raise BlockSpecError(f"Block-weight entry '{entry}' names no block.")
    if name in _ORDER:
        return (name,)
    if name in ALIASES:
        return ALIASES[name]
    if any(c in name for c in "*?["):
        found = tuple(b for b in BLOCKS if fnmatch.fnmatchcase(b, name))
        if not found:
            raise BlockSpecError(f"Block pattern '{pattern}' in '{entry}' matches no SDXL block "
                                 f"(blocks: {', '.join(BLOCKS)}).")
        return found
    if "-" in name:
        lo, _, hi = name.partition("-")
        for end in (lo, hi):
            if end not in _ORDER:
                raise BlockSpecError(f"Unknown block '{end}' in '{entry}' ({_nearest(end)}).")
        if _ORDER[lo] > _ORDER[hi]:
            raise BlockSpecError(f"Block range '{pattern}' in '{entry}' runs backwards: {lo} comes after {hi}.")
        return BLOCKS[_ORDER[lo]:_ORDER[hi] + 1]
    raise BlockSpecError(f"Unknown block '{pattern}' in '{entry}' ({_nearest(name)}).")


def _weight(value: str, entry: str) -> float:
    try:
        w = float(value)
    except ValueError:
        raise BlockSpecError(f"Weight '{value}' in '{entry}' is not a number.") from None
    if not math.isfinite(w):
        raise BlockSpecError(f"Weight '{value}' in '{entry}' is not finite.")
    return w


def _nearest(name: str) -> str:
    close = difflib.get_close_matches(name.upper(), list(BLOCKS) + list(ALIASES), n=1, cutoff=0.5)
    return f"did you mean {close[0]}?" if close else f"blocks: {', '.join(BLOCKS)}"
