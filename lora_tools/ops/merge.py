"""merge: combine LoRAs with weights, exactly (concat) or re-factorised to a target rank (svd)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from lora_tools.errors import Hint, UsageError
from lora_tools.layouts.table import Component
from lora_tools.lora.lowrank import RankRule, dense_svd, map_modules, module_threads, stack_factors, truncate
from lora_tools.lora.pairs import (
    check_same_architecture,
    dense_of,
    is_low_rank,
    module_key,
    pair_of,
    refuse_bias_diff,
    respelled,
    roles_from_pair,
)
from lora_tools.lora.validate import validate_lora
from lora_tools.ops.fit import FitReport, ModuleFit, fit_of
from lora_tools.provenance import build_record, derived_metadata, source_entry, with_record

if TYPE_CHECKING:
    from lora_tools.lora.adapter import LoraAdapter, LoraModule

MergeMethod = Literal["concat", "svd"]


@dataclass(frozen=True, slots=True)
class WeightedLora:
    """One merge input: a LoRA and the strength it enters with (what a run-time strength means).

    Attributes:
        adapter: the LoRA.
        weight: its strength.
        label: how reports and errors name it (its file name).
    """

    adapter: LoraAdapter
    weight: float = 1.0
    label: str = "lora"


@dataclass(frozen=True, slots=True)
class _Merged:
    """One merged module: its factors, weight shape and (svd) fit."""

    key: tuple[Component, str]
    up: torch.Tensor
    down: torch.Tensor
    shape: tuple[int, ...]
    fit: ModuleFit | None


def _terms(inputs: Sequence[WeightedLora]) -> dict[tuple[Component, str], list[tuple[WeightedLora, LoraModule]]]:
    by_key: dict[tuple[Component, str], list[tuple[WeightedLora, LoraModule]]] = {}
    for w in inputs:
        for m in w.adapter.modules:
            by_key.setdefault(module_key(m), []).append((w, m))
    return by_key


def merge_loras(inputs: Sequence[WeightedLora], *, method: MergeMethod = "concat",
                rule: RankRule | None = None) -> tuple[LoraAdapter, FitReport | None]:
    """Merge LoRAs so that the result at strength 1.0 is the weighted sum of their deltas.

    ``concat`` is exact: per module, ``up = [w1 s1 up1, w2 s2 up2, ...]`` and
    ``down = [down1; down2; ...]`` (``s`` the module scale), so ranks add and alpha = the new
    rank. ``svd`` re-factorises each module's weighted sum to the rule's rank through the
    stacked factors (QR, SVD of the small core), or through the dense sum where an input is
    LoHa/LoKr/full; it reports the error. Modules present in only some inputs are kept with
    their weight. Inputs in other formats are matched by their names in the first input's format.

    Args:
        inputs: the LoRAs and their weights (at least two).
        method: ``concat`` or ``svd``.
        rule: the rank rule for ``svd`` (default: the largest input rank).

    Returns:
        The merged in-memory LoRA (first input's metadata kept, a ``loratool`` record added) and,
        for ``svd``, the fit report.

    Raises:
        InvalidFileError: LoRAs for different architectures.
        UsageError: fewer than two inputs, a rule with ``concat``,
            LoHa/LoKr/full inputs with ``concat``, or DoRA inputs.
        ShapeMismatchError, NonFiniteError: an input LoRA whose factors do not fit each other or hold
            NaN/Inf (:func:`lora_tools.lora.validate.validate_lora`).
    """
    from lora_tools.lora.adapter import LoraAdapter

    if len(inputs) < 2:
        raise UsageError("merge needs at least two LoRAs", hint=Hint("loras", "with another LoRA", "PATH"))
    if method not in ("concat", "svd"):
        raise UsageError(f"unknown merge method {method!r}; expected concat or svd",
                         hint=Hint("method", "concat or svd", "NAME"))
    if method == "concat" and rule is not None:
        raise UsageError("concat is exact and keeps every rank; a target rank needs method svd",
                         hint=Hint("method", "to re-factorise to that rank", "svd"))
    with module_threads():  # many small reductions: one torch thread (see map_modules)
        for w in inputs:
            validate_lora(w.adapter, verb="merge")
    sources = [source_entry(w.adapter, strength=w.weight) for w in inputs]
    first_format = inputs[0].adapter.format
    inputs = [WeightedLora(respelled(w.adapter, first_format, w.label), w.weight, w.label) for w in inputs]
    for w in inputs:
        for m in w.adapter.modules:
            refuse_bias_diff(m, "merge")
    check_same_architecture([(w.label, w.adapter) for w in inputs])
    if method == "svd" and rule is None:
        rule = RankRule(rank=max(m.rank for w in inputs for m in w.adapter.modules))
    report = FitReport() if method == "svd" else None
    work: list[tuple[tuple[Component, str], list[tuple[WeightedLora, LoraModule]]]] = []
    for key, terms in _terms(inputs).items():
        for w, m in terms:
            if m.is_dora:
                dense_of(m)  # raises the DoRA message
            if method == "concat" and not is_low_rank(m):
                raise UsageError(
                    f"'{w.label}': module '{m.name}' is {m.algorithm}, which has no up/down factors to "
                    "concatenate", hint=Hint("method", "(it merges through the dense delta)", "svd")
                )
        work.append((key, terms))

    def merge_module(item: tuple[tuple[Component, str], list[tuple[WeightedLora, LoraModule]]]) -> _Merged:
        key, terms = item
        shape = tuple(terms[0][1].natural_shape())
        fit = None
        if all(is_low_rank(m) for _, m in terms):
            pairs = [(pair_of(m), w.weight) for w, m in terms]
            up, down = stack_factors([(p.up, p.down, p.scale * wt) for p, wt in pairs])
            if method == "svd":
                assert rule is not None
                t = truncate(up, down, rule)
                fit = fit_of(key[1], int(up.shape[1]), t, "factors")
                up, down = t.up, t.down
        else:
            assert rule is not None
            total = sum(w.weight * dense_of(m) for w, m in terms)
            assert isinstance(total, torch.Tensor)
            d = dense_svd(total, rule)
            fit = fit_of(key[1], max(m.rank for _, m in terms), d, d.method)
            up, down = d.up, d.down
        return _Merged(key, up, down, shape, fit)

    # Modules are independent: spread over the cores, one torch thread each (concat is only copies).
    merged = map_modules(merge_module, work) if method == "svd" else [merge_module(x) for x in work]
    factors: dict[tuple[Component, str], dict[str, torch.Tensor]] = {}
    alphas: dict[tuple[Component, str], float | None] = {}
    for r in merged:
        if report is not None and r.fit is not None:
            report.modules.append(r.fit)
        if r.up.shape[1] == 0:
            continue
        factors[r.key] = roles_from_pair(r.up, r.down, r.shape)
        alphas[r.key] = float(r.up.shape[1])
    first = inputs[0].adapter
    metadata = derived_metadata(first.metadata)
    ranks = [int(f["down"].shape[0]) for f in factors.values()]
    if ranks:
        metadata["ss_network_dim"] = str(max(ranks))
        metadata["ss_network_alpha"] = str(float(max(ranks)))
    params: dict[str, object] = {"method": method}
    if rule is not None:
        params["rule"] = rule.describe()
    record = build_record("merge", sources=sources,
                          params=params)
    out = LoraAdapter.from_tensors(factors, alphas=alphas, format=first.format,
                                   metadata=with_record(metadata, record))
    return out, report
