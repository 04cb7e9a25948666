"""``resize``: a LoRA's rank reduced by optimal truncated SVD (:func:`lora_tools.ops.resize.resize_lora`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import Field

from lora_tools.ops.fields import Fraction, Rank, SvRatio
from lora_tools.ops.operation import Operation, OpResult, Options, cli
from lora_tools.ops.verbs._lora import (
    LoraDtype,
    LoraOpPlan,
    dtype_field,
    output_field,
    plan_lora_output,
    rank_rule,
    write_result,
)

INPUT_KEYS = ("lora",)
OUTPUT_KEYS = ("output",)
_RULE = ("rank", "energy", "sv_ratio", "sv_fro", "sv_cumulative")


class ResizeOptions(Options):
    """Options of ``resize``: one rank rule, as the command takes it (``energy`` is ours; ``sv_*`` are kohya's
    ``resize_lora.py --dynamic_method`` rules, which keep one rank more than their count, as kohya does)."""

    lora: str = Field(json_schema_extra=cli(argument=True))
    rank: Rank | None = Field(None, description="Fixed target rank.")
    energy: Fraction | None = Field(None, description="Ours (not kohya's): keep the smallest rank retaining this "
                                 "fraction of each module's energy (squared Frobenius norm), (0, 1].")
    sv_ratio: SvRatio | None = Field(None, description="kohya's sv_ratio, exactly: 1 + the number of singular values "
                                     "> s_max / X.")
    sv_fro: Fraction | None = Field(None, description="kohya's sv_fro, exactly: 1 + the smallest rank retaining this "
                                 "fraction of the Frobenius norm (X^2 of the energy).")
    sv_cumulative: Fraction | None = Field(None, description="kohya's sv_cumulative, exactly: 1 + the smallest rank "
                                           "whose singular values sum to this fraction of their total.")
    max_rank: Rank | None = Field(None, description="Upper rank of the dynamic rules (kohya's --new_rank with a "
                                  "dynamic method; default: each module's own rank).")
    conv_rank: Rank | None = Field(None, description="Rank for convolution modules (1x1 included, as kohya's "
                                   "resize_lora.py counts them): beside a fixed rank, their fixed rank; beside a dynamic "
                                   "rule, the rule's upper rank on them (kohya's --new_conv_rank). Default: the main "
                                   "rule and its upper rank.")
    output: str = output_field()
    dtype: LoraDtype = dtype_field()


def plan(o: ResizeOptions, *, overwrite: bool = False) -> LoraOpPlan:
    """Check the rank rules and the output."""
    _rule(o)
    _conv_rule(o)
    return plan_lora_output(OPERATION, o, [o.lora], overwrite=overwrite)


def run(planned: LoraOpPlan, *, created: str | None = None, progress: Callable[[int], None] | None = None) -> OpResult:
    """Resize and write; the report is a :class:`~lora_tools.ops.resize.FitReport` with the written size."""
    from lora_tools.lora.load import load_lora
    from lora_tools.ops.lora_write import tensor_bytes
    from lora_tools.ops.resize import resize_lora

    o: Any = planned.options
    with load_lora(o.lora) as adapter:
        result, report = resize_lora(adapter, _rule(o), conv_rule=_conv_rule(o))
        report.size_bytes = tensor_bytes(result, planned.output.dtype)
        return write_result(planned, result, report, created)


def _rule(o: Any) -> Any:
    """The options' rank rule, capped at ``max_rank`` (refused beside a fixed rank: it caps the dynamic rules)."""
    rule = rank_rule(o, _RULE)
    if o.max_rank is None:
        return rule
    if rule.rank is not None:
        from lora_tools.errors import Hint, UsageError

        raise UsageError("a maximum rank caps the dynamic rules, not a fixed rank",
                         hint=Hint("max_rank", "only with a dynamic rule", "N"))
    return rule.capped(o.max_rank)


def _conv_rule(o: Any) -> Any:
    """The rule for convolutions: the fixed ``conv_rank`` beside a fixed rank; beside a dynamic rule, that rule capped
    at ``conv_rank`` instead of ``max_rank`` (kohya caps its rule at ``--new_conv_rank`` on convolutions, even above
    ``--new_rank``); ``None`` (the main rule) without ``conv_rank``."""
    if o.conv_rank is None:
        return None
    from lora_tools.lora.lowrank import RankRule

    rule = rank_rule(o, _RULE)
    return RankRule(rank=o.conv_rank) if rule.rank is not None else rule.capped(o.conv_rank)


OPERATION = Operation("resize", ResizeOptions, INPUT_KEYS, OUTPUT_KEYS, "lora", plan, run,
                      summary="reduce a LoRA's rank")
