"""A LoRA as a value: modules with factors, file-backed (lazy) or in memory, one type either way.

A :class:`LoraAdapter` read from a file keeps its tensors on disk until a factor is asked for;
one built with :meth:`LoraAdapter.from_tensors` or :meth:`LoraAdapter.with_modules` holds them in
memory. Both give the same :meth:`LoraModule.delta`, and both are written by
:func:`lora_tools.lora.save.save_lora`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from lora_tools.errors import InvalidFileError
from lora_tools.io.sources import SafetensorsSource, StateDictSource, TensorMeta
from lora_tools.layouts.table import Component

if TYPE_CHECKING:
    import torch

AdapterKind = Literal["lora", "loha", "lokr", "full"]

#: Every factor role a module can hold.
ROLES = ("up", "down", "mid", "w1a", "w1b", "w2a", "w2b", "t1", "t2", "w1", "w2", "diff", "diff_b", "dora_scale")


@dataclass(frozen=True, slots=True)
class LoraModule:
    """One adapted module of a LoRA.

    Attributes:
        component: ``unet``, ``te1`` or ``te2``.
        name: the module name as spelled in its file (no component prefix, no suffix).
        kind: ``lora`` (incl. LoCon and Tucker ``mid``), ``loha``, ``lokr`` or ``full`` (``diff``).
        keys: factor role -> tensor key in :attr:`source`. Roles: ``up``, ``down``, ``mid``, ``w1a``,
            ``w1b``, ``w2a``, ``w2b``, ``t1``, ``t2``, ``w1``, ``w2``, ``diff``, ``diff_b``, ``dora_scale``.
        alpha: the module's alpha, or ``None`` (then alpha = rank: scale 1).
        rank: the module's rank (``0`` where it has none: full diffs, undecomposed LoKr).
        source: where the factor tensors live (a file, or tensors in memory).
        naming: the naming family ``name`` is spelled in (a format name, e.g. ``kohya``, ``diffusers``).
        spelling: the factor spelling of its keys (``kohya``, ``peft``, ``legacy-lora``...).
        envelope: the exact key prefix of the module in its file (``lora_unet_``, ``unet.``...).
        alpha_meta: dtype and shape of the file's ``alpha`` tensor, when it had one (kept so a
            round trip writes the same bytes).
    """

    component: Component
    name: str
    kind: AdapterKind
    keys: Mapping[str, str]
    alpha: float | None
    rank: int
    source: SafetensorsSource | StateDictSource = field(compare=False, repr=False, default=None)  # type: ignore[assignment]
    naming: str = "kohya"
    spelling: str = "kohya"
    envelope: str | None = None
    alpha_meta: TensorMeta | None = None

    @property
    def roles(self) -> tuple[str, ...]:
        """The factor roles this module holds, in file order."""
        return tuple(self.keys)

    def factor(self, role: str) -> torch.Tensor:
        """The factor tensor of ``role``, in its stored dtype."""
        return self.source.tensor(self.keys[role])

    def factor_shape(self, role: str) -> tuple[int, ...]:
        """Shape of a factor, from the header only."""
        return tuple(self.source.meta(self.keys[role]).shape)

    def factor_dtype(self, role: str) -> str:
        """safetensors dtype name (``F16``...) of a factor, from the header only."""
        return self.source.meta(self.keys[role]).dtype

    @property
    def changes_weight(self) -> bool:
        """Whether the module changes its weight (a module may hold only a bias diff, ``.diff_b``)."""
        return not (self.kind == "full" and "diff" not in self.keys)

    @property
    def changes_bias(self) -> bool:
        """Whether the module changes the bias beside its weight (``.diff_b``/``.b_norm``)."""
        return "diff_b" in self.keys

    def bias_delta(self, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The module's dense float32 bias delta (``diff_b``), not multiplied by a strength.

        Not scaled by alpha/rank: ComfyUI adds a bias diff as a plain difference whatever the weight's
        adapter (``comfy/lora.py`` ``load_lora``: ``("diff", (diff_b,))`` on the ``.bias`` key).

        Args:
            shape: the bias' shape (``(out,)``); defaults to the stored shape.
        """
        import torch

        t = self.factor("diff_b").to(torch.float32, copy=True)
        return t.reshape(shape) if shape is not None else t

    @property
    def is_dora(self) -> bool:
        return "dora_scale" in self.keys

    @property
    def dora_axis(self) -> str | None:
        """The axis DoRA's magnitude runs along: ``"out"`` or ``"in"`` (``None`` without DoRA).

        Decided by the format and the layer, never by comparing sizes (square weights make that
        ambiguous): PEFT's ``lora_magnitude_vector`` is always per output channel (``(out,)`` for a
        Linear, ``(1, out, 1, 1)`` for a conv); kohya/LyCORIS ``dora_scale`` is ``(out, 1[, 1, 1])``
        with ``wd_on_out`` (the default) and ``(1, in[, 1, 1])`` without it.
        """
        if "dora_scale" not in self.keys:
            return None
        # A file's key says which it is (``dora_scale`` beside lora_A/lora_B is still LyCORIS'); an
        # in-memory module's keys are ``component/name/role``, so its spelling does.
        key = self.keys["dora_scale"]
        peft = "lora_magnitude_vector" in key if "/" not in key else self.spelling.startswith("peft")
        if peft:
            return "out"
        shape = self.factor_shape("dora_scale")
        if len(shape) >= 2 and shape[0] == 1 and shape[1] > 1:
            return "in"
        return "out"

    @property
    def algorithm(self) -> str:
        """Human name of the adapter algorithm (``lora``, ``lora-tucker``, ``loha``, ``+dora``...)."""
        if self.kind != "lora":
            return self.kind + ("+dora" if self.is_dora else "")
        base = "lora-tucker" if "mid" in self.keys else "lora"
        return base + ("+dora" if self.is_dora else "")

    @property
    def scale(self) -> float:
        """The factor the delta is multiplied by: THE alpha/rank rule the fuse applies.

        ``alpha / rank``; 1 when alpha is absent or 0 (kohya, ComfyUI, diffusers), for full diffs,
        and for LoKr modules whose two factors are both given in full (LyCORIS, ComfyUI).
        """
        from lora_tools.lora.scale import module_scale

        if self.kind == "full":
            return 1.0
        if self.kind == "lokr" and "w1" in self.keys and "w2" in self.keys:
            return 1.0
        return module_scale(self.alpha, self.rank)

    def natural_shape(self) -> tuple[int, ...]:
        """The shape of the delta the factors build, from headers only."""
        s = self.factor_shape
        if self.kind == "lora":
            if "mid" in self.keys:
                mid = s("mid")
                return (s("up")[0], s("down")[1], mid[2], mid[3])
            return (s("up")[0], *s("down")[1:])
        if self.kind == "full":
            return s("diff") if "diff" in self.keys else ()
        if self.kind == "loha":
            if "t1" in self.keys:
                t = s("t1")
                return (s("w1a")[1], s("w1b")[1], t[2], t[3])
            return (s("w1a")[0], *s("w1b")[1:])
        f1 = s("w1") if "w1" in self.keys else (s("w1a")[0], s("w1b")[1])
        if "w2" in self.keys:
            f2 = s("w2")
        elif "t2" in self.keys:
            t = s("t2")
            f2 = (s("w2a")[1], s("w2b")[1], t[2], t[3])
        else:
            f2 = (s("w2a")[0], *s("w2b")[1:])
        n = max(len(f1), len(f2))
        f1, f2 = f1 + (1,) * (n - len(f1)), f2 + (1,) * (n - len(f2))
        return tuple(a * b for a, b in zip(f1, f2, strict=True))

    def delta(self, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The module's dense float32 delta, multiplied by :attr:`scale` (not by a strength).

        Needs no base weight. DoRA's magnitude step does (see :func:`lora_tools.lora.delta.dora_apply`):
        for a DoRA module this is the delta before it. A module's bias diff is :meth:`bias_delta`.

        Args:
            shape: the target weight's shape (``(out, in, 3, 3)``, a 1x1 conv for a linear delta...);
                defaults to the shape the factors build.
        """
        from lora_tools.lora import delta as d

        target = tuple(shape) if shape is not None else self.natural_shape()

        def t(role: str) -> torch.Tensor | None:
            return self.factor(role) if role in self.keys else None

        if self.kind == "lora":
            raw = d.lora_delta(t("up"), t("down"), mid=t("mid"), target_shape=target)  # type: ignore[arg-type]
        elif self.kind == "loha":
            raw = d.loha_delta(t("w1a"), t("w1b"), t("w2a"), t("w2b"), t1=t("t1"), t2=t("t2"),  # type: ignore[arg-type]
                               target_shape=target)
        elif self.kind == "lokr":
            raw = d.lokr_delta(w1=t("w1"), w1a=t("w1a"), w1b=t("w1b"), w2=t("w2"), w2a=t("w2a"), w2b=t("w2b"),
                               t2=t("t2"), target_shape=target)
        else:
            if "diff" not in self.keys:
                raise InvalidFileError(f"module '{self.name}' holds only a bias diff: it has no weight delta.")
            diff = self.factor("diff")
            raw = diff.float().reshape(target) if diff.dtype != _f32() else diff.reshape(target).clone()
        scale = self.scale
        if scale != 1.0:
            raw.mul_(scale)
        return raw


def _f32() -> torch.dtype:
    import torch

    return torch.float32


@dataclass
class LoraAdapter:
    """A LoRA: its modules, metadata and format; tensors in a file (lazy) or in memory.

    Attributes:
        path: the file, or ``None`` for an adapter built in memory.
        format: the format name (see :func:`lora_tools.lora.formats.available_formats`);
            :func:`~lora_tools.lora.save.save_lora` writes this format by default.
        modules: every adapted module.
        metadata: the safetensors ``__metadata__``.
        source: the tensor source of a file-backed adapter (in memory: the tensors' store).
    """

    path: Path | None
    format: str
    modules: list[LoraModule]
    metadata: dict[str, str]
    source: SafetensorsSource | StateDictSource

    @property
    def naming(self) -> str:
        """The naming family of the module names (``kohya``, ``diffusers``...; ``mixed``)."""
        return _one({m.naming for m in self.modules}, self.format)

    @property
    def spelling(self) -> str:
        """The factor spelling of the keys (``kohya``: lora_up/lora_down, ``peft``: lora_A/lora_B...)."""
        return _one({m.spelling for m in self.modules}, "none")

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> LoraAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def with_modules(self, modules: Iterable[LoraModule], *, metadata: Mapping[str, str] | None = None,
                     format: str | None = None) -> LoraAdapter:
        """A new in-memory adapter holding ``modules`` (their factors are read now).

        Args:
            modules: the modules, from this adapter or any other (``dataclasses.replace`` them to
                change an alpha).
            metadata: the new adapter's metadata; defaults to this adapter's.
            format: its format; defaults to this adapter's.
        """
        return _materialise(list(modules), dict(self.metadata if metadata is None else metadata),
                            format or self.format)

    @classmethod
    def from_tensors(cls, factors: Mapping[tuple[Component, str], Mapping[str, torch.Tensor]], *,
                     alphas: Mapping[tuple[Component, str], float | None] | None = None,
                     format: str = "kohya", metadata: Mapping[str, str] | None = None) -> LoraAdapter:
        """Build an in-memory adapter from factor tensors.

        Args:
            factors: ``(component, module name) -> {role: tensor}``; names spelled in ``format``'s
                naming family (``down_blocks.0.attentions.0...`` for ``diffusers``,
                ``input_blocks_4_1_...`` for ``kohya``).
            alphas: ``(component, module name) -> alpha`` (absent or ``None``: alpha = rank).
            format: the adapter's format (its naming family and default spelling).
            metadata: the adapter's metadata.

        Raises:
            InvalidFileError: a module's roles do not make a known adapter kind.
        """
        from lora_tools.lora.formats import get_format

        fmt = get_format(format)
        alphas = alphas or {}
        store: dict[str, torch.Tensor] = {}
        modules = []
        for (component, name), roles in factors.items():
            keys = {}
            for role, tensor in roles.items():
                if role not in ROLES:
                    raise InvalidFileError(f"module '{name}': unknown factor role '{role}' (known: {', '.join(ROLES)}).")
                key = f"{component}/{name}/{role}"
                store[key] = tensor
                keys[role] = key
            src = StateDictSource(None, store)  # type: ignore[arg-type]
            kind = kind_of(set(keys), name, "in-memory LoRA")
            modules.append(LoraModule(component, name, kind, keys, alphas.get((component, name)),
                                      rank_of(src, kind, keys), src, naming=fmt.name, spelling=fmt.spelling))
        source = StateDictSource(None, store, dict(metadata or {}))  # type: ignore[arg-type]
        modules = [replace(m, source=source) for m in modules]
        return cls(None, fmt.name, modules, dict(metadata or {}), source)


def _one(values: set[str], empty: str) -> str:
    if not values:
        return empty
    return values.pop() if len(values) == 1 else "mixed"


def _materialise(modules: list[LoraModule], metadata: dict[str, str], fmt: str) -> LoraAdapter:
    store: dict[str, torch.Tensor] = {}
    source = StateDictSource(None, store, metadata)  # type: ignore[arg-type]
    out = []
    seen: set[tuple[str, str]] = set()
    for m in modules:
        if (m.component, m.name) in seen:
            raise InvalidFileError(f"two modules named '{m.name}' ({m.component}) in one LoRA.")
        seen.add((m.component, m.name))
        keys = {}
        for role in m.keys:
            key = f"{m.component}/{m.name}/{role}"
            store[key] = m.factor(role)
            keys[role] = key
        out.append(replace(m, keys=keys, source=source))
    return LoraAdapter(None, fmt, out, metadata, source)


def kind_of(present_roles: Iterable[str], name: str, where: str) -> AdapterKind:
    """The adapter kind a set of roles makes (``alpha`` and ``dora_scale`` aside).

    Raises:
        InvalidFileError: the roles make no kind, or a kind's factor is missing.
    """
    roles = set(present_roles)
    present = roles - {"alpha", "dora_scale"}
    if present & {"down", "up", "mid"}:
        kind: AdapterKind = "lora"
        need = {"down", "up"}
    elif present & {"w1", "w2"} or ("w1a" in present and "t1" not in present and "w2a" not in present):
        kind, need = "lokr", set()
    elif present & {"w1a", "w1b", "w2a", "w2b", "t1", "t2"}:
        kind, need = ("loha", {"w1a", "w1b", "w2a", "w2b"})
    elif present & {"diff", "diff_b"}:
        kind, need = "full", set()
    else:
        raise InvalidFileError(f"'{where}': module '{name}' has only {sorted(roles)}, no weights to apply.")
    if kind == "lokr":
        has1 = "w1" in present or {"w1a", "w1b"} <= present
        has2 = "w2" in present or {"w2a", "w2b"} <= present
        if not (has1 and has2):
            raise InvalidFileError(f"'{where}': LoKr module '{name}' lacks a factor (has {sorted(present)}).")
    missing = need - present
    if missing:
        raise InvalidFileError(f"'{where}': module '{name}' has {sorted(present)} but no {sorted(missing)[0]}.")
    return kind


def rank_of(src: SafetensorsSource | StateDictSource, kind: AdapterKind, keys: Mapping[str, str]) -> int:
    """A module's rank from factor shapes (headers only); 0 where it has none."""
    def dim0(role: str) -> int:
        return int(src.meta(keys[role]).shape[0])

    if kind == "lora":
        return dim0("down")
    if kind == "loha":
        return dim0("w1b")
    if kind == "lokr":
        if "w2b" in keys:
            return dim0("w2b")
        if "w1b" in keys:
            return dim0("w1b")
    return 0


def delta_numel(module: LoraModule) -> int:
    """Number of values of a module's dense delta (headers only)."""
    return math.prod(module.natural_shape())


__all__ = ["AdapterKind", "LoraAdapter", "LoraModule", "ROLES", "kind_of", "rank_of"]
