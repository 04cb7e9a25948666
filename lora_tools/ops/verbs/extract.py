"""``extract``: a LoRA from the difference of two models (:func:`lora_tools.ops.extract.extract_lora`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import Field

from lora_tools.ops.fields import Fraction, Rank
from lora_tools.ops.operation import Operation, OpResult, Options, cli
from lora_tools.ops.verbs._lora import (
    LoraDtype,
    LoraFormat,
    LoraOpPlan,
    components_of,
    conv_rule,
    dtype_field,
    output_field,
    plan_lora_output,
    rank_rule,
    write_result,
)

INPUT_KEYS = ("tuned", "original")
OUTPUT_KEYS = ("output",)


class ExtractOptions(Options):
    """Options of ``extract``."""

    tuned: str = Field(json_schema_extra=cli(argument=True))
    original: str = Field(json_schema_extra=cli(argument=True))
    rank: Rank | None = Field(None, description="Fixed rank of every module.")
    energy: Fraction | None = Field(None, description="Keep the smallest rank retaining this fraction of each module's "
                                 "difference, (0, 1].")
    conv_rank: Rank | None = Field(None, description="Fixed rank for kxk convolutions (default: the main rule).")
    components: str = Field("unet", description="Comma-separated: unet,te1,te2.",
                            json_schema_extra=cli(show_default=True))
    format: LoraFormat = Field("kohya-diffusers", description="Format of the written LoRA.",
                               json_schema_extra=cli(show_default=True))
    output: str = output_field()
    dtype: LoraDtype = dtype_field()


def plan(o: ExtractOptions, *, overwrite: bool = False) -> LoraOpPlan:
    """Check the rank rules and the output."""
    rank_rule(o, ("rank", "energy"))
    conv_rule(o)
    return plan_lora_output(OPERATION, o, [o.tuned, o.original], format=o.format,
                            overwrite=overwrite)


def run(planned: LoraOpPlan, *, created: str | None = None, progress: Callable[[int], None] | None = None) -> OpResult:
    """Extract and write; the report is the fit, ``extra["identical"]`` the modules equal in both models."""
    from lora_tools.ops.extract import extract_lora
    from lora_tools.ops.lora_write import tensor_bytes

    o: Any = planned.options
    result = extract_lora(o.tuned, o.original, rank_rule(o, ("rank", "energy")),
                          components=components_of(o.components) or ["unet"], conv_rule=conv_rule(o), progress=progress)
    result.report.size_bytes = tensor_bytes(result.adapter, planned.output.dtype)
    out = write_result(planned, result.adapter, result.report, created)
    out.extra["identical"] = result.identical
    return out


OPERATION = Operation("extract", ExtractOptions, INPUT_KEYS, OUTPUT_KEYS, "lora", plan, run,
                      summary="extract a LoRA from two models")
