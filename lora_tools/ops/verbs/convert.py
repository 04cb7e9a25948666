"""``convert``: a LoRA in another format, losslessly (:func:`lora_tools.ops.convert.convert_lora`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import Field

from lora_tools.ops.operation import Operation, OpResult, Options, cli
from lora_tools.ops.verbs._lora import (
    LoraDtype,
    LoraFormat,
    LoraOpPlan,
    dtype_field,
    output_field,
    plan_lora_output,
    write_result,
)

INPUT_KEYS = ("lora",)
OUTPUT_KEYS = ("output",)


class ConvertOptions(Options):
    """Options of ``convert``."""

    lora: str = Field(json_schema_extra=cli(argument=True))
    to: LoraFormat = Field(description="The format to write.")
    output: str = output_field()
    dtype: LoraDtype = dtype_field()


def plan(o: ConvertOptions, *, overwrite: bool = False) -> LoraOpPlan:
    """Check the output."""
    return plan_lora_output(OPERATION, o, [o.lora], format=o.to, overwrite=overwrite)


def run(planned: LoraOpPlan, *, created: str | None = None, progress: Callable[[int], None] | None = None) -> OpResult:
    """Convert and write; the report is ``{"from": FORMAT, "to": FORMAT, "modules": N}``."""
    from lora_tools.lora.load import load_lora
    from lora_tools.ops.convert import convert_lora

    o: Any = planned.options
    with load_lora(o.lora) as adapter:
        source_format = adapter.format
        result, _ = convert_lora(adapter, o.to)
        return write_result(planned, result, {"from": source_format, "to": o.to, "modules": len(result.modules)},
                            created)


OPERATION = Operation("convert", ConvertOptions, INPUT_KEYS, OUTPUT_KEYS, "lora", plan, run,
                      summary="write a LoRA in another format")
