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
    include: str | None = Field(None, description="Also extract these UNet modules, which kohya's and A1111/Forge's "
                                "LoRA loaders drop (left out by default, their energy reported): comma-separated "
                                "time_embedding,label_embedding,conv_in,conv_out, or all.",
                                json_schema_extra=cli(metavar="GROUPS"))
    format: LoraFormat = Field("kohya-diffusers", description="Format of the written LoRA.",
                               json_schema_extra=cli(show_default=True))
    output: str = output_field()
    dtype: LoraDtype = dtype_field()


def plan(o: ExtractOptions, *, overwrite: bool = False) -> LoraOpPlan:
    """Check the rank rules and the output."""
    from lora_tools.ops.extract import include_groups

    rank_rule(o, ("rank", "energy"))
    conv_rule(o)
    include_groups(o.include)
    _check_order(o.tuned, o.original)
    return plan_lora_output(OPERATION, o, [o.tuned, o.original], format=o.format,
                            overwrite=overwrite)


def run(planned: LoraOpPlan, *, created: str | None = None, progress: Callable[[int], None] | None = None) -> OpResult:
    """Extract and write; the report is the fit, ``extra["identical"]`` the modules equal in both models,
    ``extra["left_out"]`` each module group left out with its share of the difference's energy."""
    from lora_tools.ops.extract import extract_lora, include_groups
    from lora_tools.ops.lora_write import tensor_bytes

    o: Any = planned.options
    result = extract_lora(o.tuned, o.original, rank_rule(o, ("rank", "energy")),
                          components=components_of(o.components) or ["unet"], conv_rule=conv_rule(o),
                          include=include_groups(o.include), progress=progress)
    if not result.adapter.modules:
        from lora_tools.errors import UsageError

        raise UsageError(f"'{o.tuned}' and '{o.original}' do not differ in any {o.components} module "
                         f"({result.identical} identical): there is no LoRA to extract, nothing was written.")
    result.report.size_bytes = tensor_bytes(result.adapter, planned.output.dtype)
    out = write_result(planned, result.adapter, result.report, created)
    out.extra["identical"] = result.identical
    out.extra["left_out"] = result.left_out_report()
    return out


def _check_order(tuned: str, original: str) -> None:
    """Refuse ORIGINAL made by ``loratool fuse`` when TUNED was not: the arguments are swapped (the LoRA would be
    the negated difference). TUNED comes first, as kohya's ``--model_tuned``/``--model_org``."""
    from pathlib import Path

    from lora_tools.errors import UsageError
    from lora_tools.io.safetensors import read_header
    from lora_tools.provenance import read_record

    def made_by(model: str) -> str | None:
        path = Path(model)
        path = path / "unet" / "diffusion_pytorch_model.safetensors" if path.is_dir() else path
        try:
            record = read_record(read_header(path).metadata)
        except Exception:  # noqa: BLE001 - an unreadable model is reported when it is opened
            return None
        return record.get("operation") if record else None

    if made_by(original) == "fuse" and made_by(tuned) is None:
        raise UsageError(f"ORIGINAL '{original}' was made by loratool fuse and TUNED '{tuned}' was not: the order is "
                         "TUNED ORIGINAL (the fine-tuned model first); swap them.")


OPERATION = Operation("extract", ExtractOptions, INPUT_KEYS, OUTPUT_KEYS, "lora", plan, run,
                      summary="extract a LoRA from two models")
