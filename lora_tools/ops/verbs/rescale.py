"""``rescale``: bake a strength into a LoRA (:func:`lora_tools.ops.rescale.rescale_lora`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import Field

from lora_tools.ops.fields import Strength
from lora_tools.ops.operation import Operation, OpResult, Options, cli
from lora_tools.ops.verbs._lora import (
    LoraDtype,
    LoraOpPlan,
    components_of,
    dtype_field,
    output_field,
    plan_lora_output,
    write_result,
)

INPUT_KEYS = ("lora",)
OUTPUT_KEYS = ("output",)


class RescaleOptions(Options):
    """Options of ``rescale`` (``loratool rescale``, a recipe's ``rescale:`` job)."""

    lora: str = Field(json_schema_extra=cli(argument=True))
    strength: Strength = Field(description="The strength to bake in (the new file at 1.0 = the old at S).")
    blocks: str | None = Field(None, description="Per-block strengths multiplied in, e.g. 'IN04-IN08:0.5,OUT*:0'.",
                               json_schema_extra=cli(metavar="SPEC"))
    components: str | None = Field(None, description="Comma-separated components the strength applies to "
                                   "(unet,te1,te2); default all.")
    output: str = output_field()
    dtype: LoraDtype = dtype_field()


def plan(o: RescaleOptions, *, overwrite: bool = False) -> LoraOpPlan:
    """Check the block spec and the output."""
    from lora_tools.layouts.blocks import parse_block_weights

    if o.blocks is not None:
        parse_block_weights(o.blocks)
    return plan_lora_output(OPERATION, o, [o.lora], overwrite=overwrite)


def run(planned: LoraOpPlan, *, created: str | None = None, progress: Callable[[int], None] | None = None) -> OpResult:
    """Rescale and write; the report is a :class:`~lora_tools.ops.rescale.RescaleReport`."""
    from lora_tools.layouts.blocks import parse_block_weights
    from lora_tools.lora.load import load_lora
    from lora_tools.ops.rescale import rescale_lora

    o: Any = planned.options
    blocks = parse_block_weights(o.blocks) if o.blocks is not None else None
    with load_lora(o.lora) as adapter:
        result, report = rescale_lora(adapter, float(o.strength), blocks=blocks, components=components_of(o.components))
        return write_result(planned, result, report, created)


OPERATION = Operation("rescale", RescaleOptions, INPUT_KEYS, OUTPUT_KEYS, "lora", plan, run,
                      summary="bake a strength into a LoRA")
