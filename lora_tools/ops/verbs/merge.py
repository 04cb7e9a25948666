"""``merge``: LoRAs combined with weights, exactly or to a rank (:func:`lora_tools.ops.merge.merge_loras`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from lora_tools.ops.fields import Fraction, Rank
from lora_tools.ops.operation import Operation, OpResult, Options, cli
from lora_tools.ops.verbs._lora import (
    LoraDtype,
    LoraOpPlan,
    WeightedRef,
    dtype_field,
    output_field,
    plan_lora_output,
    rank_rule,
    short_form,
    write_result,
)

INPUT_KEYS = ("loras",)
OUTPUT_KEYS = ("output",)


class MergeOptions(Options):
    """Options of ``merge``."""

    loras: list[WeightedRef] = Field(json_schema_extra=cli(argument=True, metavar="LORA[:W]...",
                                                           kind="weighted_ref"))
    method: Literal["concat", "svd"] = Field(
        "concat", description="concat: exact (ranks add); svd: re-factorise the weighted sum to --rank/--energy.",
        json_schema_extra=cli(show_default=True))
    rank: Rank | None = Field(None, description="Target rank for --method svd (default: the largest input rank).")
    energy: Fraction | None = Field(None, description="Retained energy per module for --method svd, (0, 1].")
    output: str = output_field()
    dtype: LoraDtype = dtype_field()

    @field_validator("loras", mode="before")
    @classmethod
    def _short_form(cls, v: Any) -> Any:
        return short_form(v)

    @field_validator("loras")
    @classmethod
    def _two(cls, v: list[WeightedRef]) -> list[WeightedRef]:
        if len(v) < 2:
            raise ValueError("merge needs at least two LoRAs")
        return v


def _rule(o: Any) -> Any:
    return rank_rule(o, ("rank", "energy")) if (o.rank is not None or o.energy is not None) else None


def plan(o: MergeOptions, *, overwrite: bool = False) -> LoraOpPlan:
    """Check the inputs' count, the rank rule and the output."""
    from lora_tools.errors import UsageError

    if len(o.loras) < 2:
        raise UsageError("merge needs at least two LoRAs")
    _rule(o)
    return plan_lora_output(OPERATION, o, [x.lora for x in o.loras],
                            overwrite=overwrite)


def run(planned: LoraOpPlan, *, created: str | None = None, progress: Callable[[int], None] | None = None) -> OpResult:
    """Merge and write; the report is the ``svd`` fit (``None`` for ``concat``)."""
    from contextlib import ExitStack

    from lora_tools.lora.load import load_lora
    from lora_tools.ops.merge import WeightedLora, merge_loras

    o: Any = planned.options
    with ExitStack() as stack:
        inputs = [WeightedLora(stack.enter_context(load_lora(x.lora)), float(x.weight), Path(x.lora).name)
                  for x in o.loras]
        result, report = merge_loras(inputs, method=o.method, rule=_rule(o))
        return write_result(planned, result, report, created)


OPERATION = Operation("merge", MergeOptions, INPUT_KEYS, OUTPUT_KEYS, "lora", plan, run,
                      summary="merge LoRAs with weights")
