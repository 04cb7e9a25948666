"""What the LoRA-writing verbs share: option types, the planned output, and the one write with its record."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from lora_tools.io.remote import as_path
from lora_tools.ops.fields import Strength, Weight
from lora_tools.ops.operation import Operation, OpResult, Options, cli

if TYPE_CHECKING:
    from lora_tools.lora.adapter import LoraAdapter
    from lora_tools.ops.lora_write import LoraOutput

LoraDtype = Literal["keep", "fp16", "bf16", "fp32"]
LoraFormat = Literal["kohya", "kohya-diffusers", "diffusers", "peft", "comfy"]

#: The options every LoRA-writing verb ends with (``-o/--output``, ``--dtype``).
OUTPUT_HELP = "The LoRA file to write (never one of the inputs)."
DTYPE_HELP = "dtype of the written factors; keep: the input's (maths is always fp32)."


def output_field() -> Any:
    return Field(description=OUTPUT_HELP, json_schema_extra=cli("-o", "--output"))


def dtype_field() -> Any:
    return Field("keep", description=DTYPE_HELP, json_schema_extra=cli(show_default=True))


class LoraRef(Options):
    """One LoRA and its strength: an input name, a job name or a path (``SRC[:STRENGTH]`` on the command line)."""

    lora: str
    strength: Strength = 1.0


class WeightedRef(Options):
    """One input of a ``merge`` and its weight (``LORA[:W]`` on the command line)."""

    lora: str
    weight: Weight = 1.0


def short_form(v: Any) -> Any:
    """``loras: [style]`` is short for ``[{lora: style}]``."""
    return [{"lora": x} if isinstance(x, str) else x for x in v] if isinstance(v, list) else v


def components_of(text: str | None) -> list[str] | None:
    """``unet,te1`` -> ``["unet", "te1"]`` (``None`` or empty: every component)."""
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


@dataclass
class LoraOpPlan:
    """A planned LoRA-writing run: its options and checked output (nothing computed yet)."""

    operation: Operation
    options: Any
    output: LoraOutput

    @cached_property
    def entry(self) -> dict[str, Any]:
        """The run's record entry (inputs hashed once)."""
        return self.operation.entry(self.options)

    def close(self) -> None:
        """Nothing to release (the inputs are opened by ``run``)."""


def plan_lora_output(operation: Operation, options: Any, inputs: Sequence[str], *, format: str | None = None,
                     overwrite: bool = False) -> LoraOpPlan:
    """Check the output before any maths (:func:`lora_tools.ops.lora_write.plan_output`); ``dtype: keep`` is the
    inputs' dtype (the maths runs in fp32: keeping the factors' dtype would write fp32 from fp16 inputs)."""
    from lora_tools.ops.lora_write import input_dtype, plan_output

    dtype = getattr(options, "dtype", None)
    if dtype in (None, "keep"):
        dtype = input_dtype(inputs) or dtype
    out = plan_output(options.output, list(inputs), format=format, dtype=dtype, overwrite=overwrite)
    return LoraOpPlan(operation, options, out)


def write_result(planned: LoraOpPlan, adapter: LoraAdapter, report: Any, created: str | None) -> OpResult:
    """Write ``adapter`` through the one LoRA writer, its record holding the run's entry."""
    from lora_tools.ops.lora_write import write_lora
    from lora_tools.provenance import read_record, stamped

    if not adapter.modules:
        from lora_tools.errors import UsageError

        raise UsageError(f"{planned.operation.name} would write a LoRA with no modules to "
                         f"'{planned.output.path}': nothing was written.")
    record = stamped(read_record(adapter.metadata), planned.entry, created)
    path = write_lora(adapter, planned.output, record=record)
    if getattr(report, "size_bytes", None) is not None:
        report.size_bytes = as_path(path).stat().st_size  # the size printed is the file's, header included
    return OpResult([as_path(path)], report, adapter)


def rank_rule(o: Any, keys: tuple[str, ...]) -> Any:
    from lora_tools.lora.lowrank import RankRule

    return RankRule(**{k: getattr(o, k) for k in keys})


def conv_rule(o: Any) -> Any:
    from lora_tools.lora.lowrank import RankRule

    return RankRule(rank=o.conv_rank) if o.conv_rank is not None else None
