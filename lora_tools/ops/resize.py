"""resize: rank reduction of every module by optimal truncated SVD, through the factors."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora_tools.errors import UsageError
from lora_tools.lora.lowrank import RankRule, dense_svd, truncate
from lora_tools.lora.pairs import (
    dense_of,
    is_low_rank,
    module_key,
    pair_of,
    refuse_bias_diff,
    roles_from_pair,
)
from lora_tools.lora.validate import validate_lora
from lora_tools.ops.fit import FitReport, fit_of
from lora_tools.provenance import build_record, derived_metadata, source_entry, with_record

if TYPE_CHECKING:
    from lora_tools.lora.adapter import LoraAdapter


def resize_lora(adapter: LoraAdapter, rule: RankRule, *, conv_rule: RankRule | None = None
                ) -> tuple[LoraAdapter, FitReport]:
    """Reduce every module's rank by optimal truncated SVD of its delta.

    Plain LoRA/LoCon/Tucker modules go through their factors (QR of ``up`` and ``down``, SVD of
    the ``r x r`` core; the dense delta is never formed); LoHa, LoKr and full diffs through
    their dense delta. Each output module is a plain LoRA pair with alpha = its new rank (scale
    1), the singular values split evenly between ``up`` and ``down``.

    kohya's dynamic rules (``sv_ratio``, ``sv_fro``, ``sv_cumulative``) keep kohya's rank module by module
    (:func:`lora_tools.lora.lowrank.choose_rank`), capped at the module's own rank: where kohya's count + 1 exceeds
    it, kohya keeps a direction of singular value ~0, which changes nothing. A zero delta is dropped (kohya: rank 1).

    Args:
        adapter: the input LoRA.
        rule: the rank rule for linear modules.
        conv_rule: the rule for convolution modules, 1x1 included (kohya's ``resize_lora.py`` gives every module
            with 4-D factors its ``--new_conv_rank``); default: `rule`.

    Returns:
        The resized in-memory LoRA (metadata kept, ss_network_dim/alpha updated, a ``loratool``
        record added) and the fit report.

    Raises:
        UsageError: a fixed rank larger than every module's rank, or a DoRA module.
        ShapeMismatchError, NonFiniteError: an input LoRA whose factors do not fit each other or hold
            NaN/Inf (:func:`lora_tools.lora.validate.validate_lora`).
    """
    from lora_tools.lora.adapter import LoraAdapter

    validate_lora(adapter, verb="resize")
    max_rank = max((m.rank for m in adapter.modules), default=0)
    for r in (rule, conv_rule):
        if r is not None and r.rank is not None and r.rank > max_rank:
            raise UsageError(f"rank {r.rank} is larger than the LoRA's largest rank ({max_rank}); "
                             "a resize can only reduce the rank")
    report = FitReport()
    factors, alphas = {}, {}
    for m in adapter.modules:
        refuse_bias_diff(m, "resize")
        shape = tuple(m.natural_shape())
        r = conv_rule if conv_rule is not None and len(shape) == 4 else rule
        if is_low_rank(m):
            p = pair_of(m)
            t = truncate(p.up, p.down, _capped(r, m.rank), scale=p.scale)
            report.modules.append(fit_of(m.name, m.rank, t, "factors"))
            up, down = t.up, t.down
        else:
            d = dense_svd(dense_of(m), _capped(r, min(shape[0], int(dense_of_numel(shape)))))
            report.modules.append(fit_of(m.name, m.rank, d, d.method))
            up, down = d.up, d.down
        if up.shape[1] == 0:
            continue  # a zero delta: nothing to keep
        factors[module_key(m)] = roles_from_pair(up, down, shape)
        alphas[module_key(m)] = float(up.shape[1])
    metadata = derived_metadata(adapter.metadata)
    ranks = [int(f["down"].shape[0]) for f in factors.values()]
    if ranks:
        metadata["ss_network_dim"] = str(max(ranks))
        metadata["ss_network_alpha"] = str(float(max(ranks)))
    params = {"rule": rule.describe(), **({"conv_rule": conv_rule.describe()} if conv_rule else {})}
    record = build_record("resize", sources=[source_entry(adapter)], params=params,
                          retained_energy=report.retained_energy)
    out = LoraAdapter.from_tensors(factors, alphas=alphas, format=adapter.format,
                                   metadata=with_record(metadata, record))
    return out, report


def dense_of_numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape[1:]:
        n *= d
    return n


def _capped(rule: RankRule, cap: int) -> RankRule:
    """`rule` with its rank capped at `cap` (a fixed rank above it keeps the module's rank)."""
    return rule.capped(cap) if cap > 0 else rule
