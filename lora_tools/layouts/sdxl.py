"""The SDXL single-file layout as a whole: configs for full and tiny models, the combined table,
config detection from a file's own shapes, and tensor transforms between layouts."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import TYPE_CHECKING

from lora_tools.errors import KeyMismatchError
from lora_tools.layouts.clip import CLIP_BIGG, CLIP_L, ClipConfig, clip_config_from_shapes, clip_g_table, clip_l_table
from lora_tools.layouts.table import SGM_PREFIXES, Component, KeyMap
from lora_tools.layouts.unet import UnetConfig, unet_config_from_shapes, unet_table
from lora_tools.layouts.vae import VaeConfig, vae_config_from_shapes, vae_table

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SDXLConfig:
    """Structure and widths of every component of an SDXL-topology model."""

    unet: UnetConfig = field(default_factory=UnetConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    te1: ClipConfig = CLIP_L
    te2: ClipConfig = CLIP_BIGG

    @cached_property
    def table(self) -> LayoutTable:
        return LayoutTable(unet_table(self.unet) + vae_table(self.vae) + clip_l_table(self.te1) + clip_g_table(self.te2))


FULL = SDXLConfig()
TINY = SDXLConfig(
    unet=UnetConfig(model_channels=32, channel_mult=(1, 2, 4), depths=(0, 2, 10), mid_depth=10,
                    context_dim=64, adm_in_channels=32 + 6 * 8, head_dim=16, addition_time_embed_dim=8),
    vae=VaeConfig(channels=(32, 32, 64, 64)),
    te1=ClipConfig(hidden=32, layers=12, heads=2, intermediate=64, vocab=1000),
    te2=ClipConfig(hidden=32, layers=32, heads=2, intermediate=64, vocab=1000, projection=32, act="gelu"),
)
SIZES: dict[str, SDXLConfig] = {"tiny": TINY, "full": FULL}


class LayoutTable:
    """All :class:`KeyMap` rows of a model with look-ups by single-file and diffusers key."""

    def __init__(self, rows: Iterable[KeyMap]):
        self.rows = list(rows)
        self.by_sgm_key: dict[str, list[KeyMap]] = {}
        self.by_diffusers: dict[tuple[Component, str], KeyMap] = {}
        for r in self.rows:
            self.by_sgm_key.setdefault(r.sgm_key, []).append(r)
            if r.diffusers is not None:
                self.by_diffusers[(r.component, r.diffusers)] = r

    def component_rows(self, component: Component) -> list[KeyMap]:
        return [r for r in self.rows if r.component == component]

    def sgm_keys(self, component: Component | None = None) -> list[str]:
        """Single-file keys in table order, each once."""
        seen: dict[str, None] = {}
        for r in self.rows:
            if component is None or r.component == component:
                seen.setdefault(r.sgm_key, None)
        return list(seen)

    def check_total(self, keys: Iterable[str], source: str, components: Iterable[Component]) -> None:
        """Raise if ``keys`` (of the given components) are not exactly the table's keys."""
        comps = set(components)
        prefixes = tuple(SGM_PREFIXES[c] for c in comps)
        have = {k for k in keys if k.startswith(prefixes)}
        want = {r.sgm_key for r in self.rows if r.component in comps}
        required = {r.sgm_key for r in self.rows if r.component in comps and not r.optional}
        extra, missing = sorted(have - want), sorted(required - have)
        if extra or missing:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing (first: {missing[0]})")
            if extra:
                parts.append(f"{len(extra)} not in the SDXL layout (first: {extra[0]})")
            raise KeyMismatchError(f"'{source}' does not match the SDXL layout: {', '.join(parts)}.")


def config_from_shapes(shapes: dict[str, tuple[int, ...]], components: Iterable[Component] | None = None) -> SDXLConfig:
    """Build the :class:`SDXLConfig` of a single file from its own tensor shapes.

    Components absent from the file keep the full-size defaults.
    """
    comps = set(components) if components is not None else {
        c for c, p in SGM_PREFIXES.items() if any(k.startswith(p) for k in shapes)
    }
    te2 = clip_config_from_shapes(shapes, SGM_PREFIXES["te2"], open_clip=True) if "te2" in comps else CLIP_BIGG
    return SDXLConfig(
        unet=unet_config_from_shapes(shapes, SGM_PREFIXES["unet"], pooled_dim=te2.projection) if "unet" in comps else UnetConfig(),
        vae=vae_config_from_shapes(shapes, SGM_PREFIXES["vae"]) if "vae" in comps else VaeConfig(),
        te1=clip_config_from_shapes(shapes, SGM_PREFIXES["te1"], open_clip=False) if "te1" in comps else CLIP_L,
        te2=te2,
    )


def to_diffusers(row: KeyMap, sgm_tensor: torch.Tensor) -> torch.Tensor:
    """Turn a single-file tensor into the diffusers tensor of ``row``."""
    if row.transform == "conv1x1_to_linear":
        return sgm_tensor.reshape(sgm_tensor.shape[:2])
    if row.transform == "transpose":
        return sgm_tensor.t().contiguous()
    if row.transform == "slice":
        assert row.part is not None
        i, n = row.part
        step = sgm_tensor.shape[0] // n
        return sgm_tensor[i * step:(i + 1) * step].contiguous()
    return sgm_tensor


def to_sgm(rows: list[KeyMap], get: Callable[[KeyMap], torch.Tensor]) -> torch.Tensor:
    """Build one single-file tensor from the diffusers tensors of its rows (all share ``sgm``)."""
    import torch

    first = rows[0]
    if first.transform == "slice":
        parts = sorted(rows, key=lambda r: r.part or (0, 1))
        return torch.cat([get(r) for r in parts], dim=0)
    t = get(first)
    if first.transform == "conv1x1_to_linear":
        return t.reshape(first.shape)
    if first.transform == "transpose":
        return t.t().contiguous()
    return t


def sgm_to_diffusers_state_dicts(
    tensors: dict[str, torch.Tensor], table: LayoutTable, components: Iterable[Component], *, source: str = "checkpoint"
) -> dict[Component, dict[str, torch.Tensor]]:
    """Convert single-file tensors into one diffusers state dict per component (total)."""
    comps = list(components)
    table.check_total(tensors.keys(), source, comps)
    out: dict[Component, dict[str, torch.Tensor]] = {c: {} for c in comps}
    for r in table.rows:
        if r.component in out and r.diffusers is not None and r.sgm_key in tensors:
            out[r.component][r.diffusers] = to_diffusers(r, tensors[r.sgm_key])
    return out


def _diffusers_tensor(state_dict: dict[str, torch.Tensor], row: KeyMap) -> torch.Tensor:
    """The tensor of ``row`` in a diffusers state dict (a row without a diffusers key has none)."""
    if row.diffusers is None:
        raise KeyError(row.sgm)
    return state_dict[row.diffusers]


def diffusers_to_sgm_state_dict(
    state_dicts: dict[Component, dict[str, torch.Tensor]], table: LayoutTable, *, source: str = "diffusers model"
) -> dict[str, torch.Tensor]:
    """Convert diffusers state dicts (one per component) into single-file tensors (total)."""
    out: dict[str, torch.Tensor] = {}
    for comp, sd in state_dicts.items():
        rows = table.component_rows(comp)
        want = {r.diffusers for r in rows if r.diffusers is not None}
        extra = sorted(set(sd) - want - {"text_model.embeddings.position_ids"})
        missing = sorted(want - set(sd))
        if extra or missing:
            first = (missing or extra)[0]
            raise KeyMismatchError(
                f"'{source}' {comp} does not match the SDXL layout: {len(missing)} missing, {len(extra)} unknown (first: {first})."
            )
        for sgm_key, group in _group_by_sgm(rows).items():
            if group[0].diffusers is None:
                continue
            out[sgm_key] = to_sgm(group, partial(_diffusers_tensor, sd))
    return out


def _group_by_sgm(rows: list[KeyMap]) -> dict[str, list[KeyMap]]:
    groups: dict[str, list[KeyMap]] = {}
    for r in rows:
        groups.setdefault(r.sgm_key, []).append(r)
    return groups
