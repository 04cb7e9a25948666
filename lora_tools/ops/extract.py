"""extract: a LoRA from the difference of two models, streamed module by module."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lora_tools.engine.differences import paired_targets, stream_differences
from lora_tools.layouts.table import Component
from lora_tools.lora.lowrank import DenseSvd, ModulePool, RankRule, dense_svd
from lora_tools.lora.pairs import roles_from_pair
from lora_tools.ops.fit import FitReport, fit_of
from lora_tools.provenance import build_record, with_record

if TYPE_CHECKING:
    from lora_tools.layouts.targets import ModuleTarget
    from lora_tools.lora.adapter import LoraAdapter


#: UNet module groups that kohya's LoRA loader (``networks/lora.py``: Transformer2DModel, ResnetBlock2D,
#: Downsample2D and Upsample2D modules only) and A1111/Forge's built-in loader silently drop, by the prefix of
#: their diffusers module names. ``extract`` leaves them out unless asked (``include``) and reports their energy.
OPTIONAL_GROUPS: dict[str, str] = {
    "time_embedding": "time_embedding.",
    "label_embedding": "add_embedding.",
    "conv_in": "conv_in",
    "conv_out": "conv_out",
}


def optional_group(t: ModuleTarget) -> str | None:
    """The :data:`OPTIONAL_GROUPS` group a module target belongs to, or ``None`` (every loader loads it)."""
    if t.component != "unet":
        return None
    name = t.diffusers_module
    return next((g for g, prefix in OPTIONAL_GROUPS.items() if name == prefix or name.startswith(prefix)), None)


def include_groups(text: str | Iterable[str] | None) -> tuple[str, ...]:
    """``time_embedding,conv_in`` (or ``all``) -> the groups, checked against :data:`OPTIONAL_GROUPS`.

    Raises:
        UsageError: an unknown group name.
    """
    from lora_tools.errors import Hint, UsageError

    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else (text or ())) if n.strip()]
    if names == ["all"]:
        return tuple(OPTIONAL_GROUPS)
    unknown = [n for n in names if n not in OPTIONAL_GROUPS]
    if unknown:
        raise UsageError(f"unknown module group {unknown[0]!r}; expected {', '.join(OPTIONAL_GROUPS)} or all",
                         hint=Hint("include", "naming groups from that list", "GROUPS"))
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True, slots=True)
class ExtractResult:
    """An extracted LoRA and its fit.

    Attributes:
        adapter: the LoRA (diffusers module names; alpha = rank).
        report: per-module and overall retained energy, with each module's measured error.
        identical: modules whose difference is exactly zero (left out).
        left_out: each :data:`OPTIONAL_GROUPS` group not included -> its difference's energy (squared
            Frobenius norm), over the components extracted.
        total_energy: the energy of the whole difference over the components extracted, left-out groups included.
    """

    adapter: LoraAdapter
    report: FitReport
    identical: int
    left_out: dict[str, float] = field(default_factory=dict)
    total_energy: float = 0.0

    def left_out_report(self) -> dict[str, dict[str, float]]:
        """``group -> {"energy": squared Frobenius norm, "share": its fraction of the whole difference's}``."""
        total = self.total_energy
        return {g: {"energy": e, "share": e / total if total > 0 else 0.0} for g, e in self.left_out.items()}


def extract_lora(tuned: str | Path, original: str | Path, rule: RankRule, *,
                 components: Iterable[str] = ("unet",), conv_rule: RankRule | None = None,
                 include: Iterable[str] = (), progress: Callable[[int], None] | None = None) -> ExtractResult:
    """A LoRA whose delta approximates ``tuned - original``, module by module.

    Each module's difference is factorised by :func:`lora_tools.lora.lowrank.dense_svd` (full SVD for
    small matrices, randomized with oversampling and power iterations for large ones) and its
    error measured on the residual. Both models are read in one pass through the shared engine
    (:func:`~lora_tools.engine.differences.stream_differences`): a few tensors in memory at a time, whatever the models' size.

    Args:
        tuned: the fine-tuned model (single file, diffusers UNet file or folder).
        original: the model it was tuned from.
        rule: the rank rule.
        components: which components to extract (``unet``, ``te1``, ``te2``).
        conv_rule: the rule for kxk convolutions (default: `rule`).
        include: :data:`OPTIONAL_GROUPS` groups to extract too (by default they are left out, as kohya's and
            A1111's loaders drop them; their energy is reported in :attr:`ExtractResult.left_out`).
        progress: called with the bytes of each pair of tensors once processed.

    Raises:
        InvalidFileError: the models are of different architectures or shapes.
    """
    from lora_tools.io.model import open_model
    from lora_tools.lora.adapter import LoraAdapter

    labels = (Path(tuned).name, Path(original).name)
    report = FitReport()
    factors: dict[tuple[Component, str], dict[str, torch.Tensor]] = {}
    alphas: dict[tuple[Component, str], float | None] = {}
    identical = 0
    included = set(include_groups(include))
    components = list(components)
    left_out: dict[str, float] = {g: 0.0 for g in OPTIONAL_GROUPS if g not in included} if "unet" in components else {}
    with open_model(tuned) as a, open_model(original) as b:
        targets = paired_targets(a, b, components, labels)

        def factorise(item: tuple[ModuleTarget, torch.Tensor]) -> tuple[ModuleTarget, DenseSvd | float | None]:
            t, diff = item
            if optional_group(t) in left_out:
                return t, float(torch.linalg.vector_norm(diff, dtype=torch.float64)) ** 2
            if not bool(diff.any()):
                return t, None
            conv = len(t.shape) == 4 and t.shape[2] * t.shape[3] > 1
            r = conv_rule if conv and conv_rule is not None else rule
            return t, dense_svd(diff.reshape(diff.shape[0], -1), r)

        def keep(result: tuple[ModuleTarget, DenseSvd | float | None]) -> None:
            nonlocal identical
            t, d = result
            if isinstance(d, float):
                left_out[optional_group(t) or ""] += d
                return
            if d is None:
                identical += 1
                return
            report.modules.append(fit_of(t.diffusers_module, 0, d, d.method))
            key = (t.component, t.diffusers_module)
            factors[key] = roles_from_pair(d.up, d.down, tuple(t.shape))
            alphas[key] = float(d.rank)

        # The reader thread reads ahead while every core factorises a module (one torch thread
        # each); the results are kept in module order, so the output does not depend on timing.
        with ModulePool(factorise, keep) as pool:
            stream_differences(a, b, targets, lambda t, diff: pool.submit((t, diff)), progress=progress)
    record = build_record("extract", sources=[{"role": "tuned", "name": labels[0]},
                                              {"role": "original", "name": labels[1]}],
                          params={"rule": rule.describe(), "components": components,
                                  "include": [g for g in OPTIONAL_GROUPS if g in included]},
                          retained_energy=report.retained_energy)
    dim = max((int(f["down"].shape[0]) for f in factors.values()), default=0)
    metadata = with_record({"ss_network_module": "networks.lora", "ss_network_dim": str(dim),
                            "ss_network_alpha": str(float(dim))}, record)
    adapter = LoraAdapter.from_tensors(factors, alphas=alphas, format="diffusers", metadata=metadata)
    total = sum(m.energy for m in report.modules) + sum(left_out.values())
    return ExtractResult(adapter, report, identical, left_out, total)
