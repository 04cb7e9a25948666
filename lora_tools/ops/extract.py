"""extract: a LoRA from the difference of two models, streamed module by module."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class ExtractResult:
    """An extracted LoRA and its fit.

    Attributes:
        adapter: the LoRA (diffusers module names; alpha = rank).
        report: per-module and overall retained energy, with each module's measured error.
        identical: modules whose difference is exactly zero (left out).
    """

    adapter: LoraAdapter
    report: FitReport
    identical: int


def extract_lora(tuned: str | Path, original: str | Path, rule: RankRule, *,
                 components: Iterable[str] = ("unet",), conv_rule: RankRule | None = None,
                 progress: Callable[[int], None] | None = None) -> ExtractResult:
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
    with open_model(tuned) as a, open_model(original) as b:
        targets = paired_targets(a, b, components, labels)

        def factorise(item: tuple[ModuleTarget, torch.Tensor]) -> tuple[ModuleTarget, DenseSvd | None]:
            t, diff = item
            if not bool(diff.any()):
                return t, None
            conv = len(t.shape) == 4 and t.shape[2] * t.shape[3] > 1
            r = conv_rule if conv and conv_rule is not None else rule
            return t, dense_svd(diff.reshape(diff.shape[0], -1), r)

        def keep(result: tuple[ModuleTarget, DenseSvd | None]) -> None:
            nonlocal identical
            t, d = result
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
                          params={"rule": rule.describe(), "components": list(components)},
                          retained_energy=report.retained_energy)
    dim = max((int(f["down"].shape[0]) for f in factors.values()), default=0)
    metadata = with_record({"ss_network_module": "networks.lora", "ss_network_dim": str(dim),
                            "ss_network_alpha": str(float(dim))}, record)
    adapter = LoraAdapter.from_tensors(factors, alphas=alphas, format="diffusers", metadata=metadata)
    return ExtractResult(adapter, report, identical)
