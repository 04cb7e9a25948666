"""``loratool merge``: combine LoRAs with weights, exactly (concat) or to a target rank (svd)."""

from __future__ import annotations

import click

from lora_tools.cli._options import emit, output_options
from lora_tools.cli._output import safe_text
from lora_tools.cli._types import FRACTION, LORA_WEIGHT, RANK


@click.command("merge")
@click.argument("loras", nargs=-1, required=True, metavar="LORA[:W]...", type=LORA_WEIGHT)
@click.option("--method", type=click.Choice(["concat", "svd"]), default="concat", show_default=True,
              help="concat: exact (ranks add); svd: re-factorise the weighted sum to --rank/--energy.")
@click.option("--rank", type=RANK, help="Target rank for --method svd (default: the largest input rank).")
@click.option("--energy", type=FRACTION, help="Retained energy per module for --method svd, (0, 1].")
@output_options
def merge_command(loras: tuple[tuple[str, float], ...], method: str, rank: int | None, energy: float | None,
                  output: str, overwrite: bool, dtype: str, as_json: bool) -> None:
    """Merge LoRAs: the result at strength 1.0 is the sum of each LORA at its weight W (default 1).

    \b
    Example:
        loratool merge lightning.safetensors style.safetensors:0.6 -o both.safetensors
        loratool merge a.safetensors b.safetensors:0.5 --method svd --rank 64 -o ab.safetensors
    """
    from contextlib import ExitStack
    from pathlib import Path

    from lora_tools.errors import UsageError
    from lora_tools.lora.load import load_lora
    from lora_tools.lora.lowrank import RankRule
    from lora_tools.ops.lora_write import plan_output, write_lora
    from lora_tools.ops.merge import WeightedLora, merge_loras
    from lora_tools.recipes.lora_jobs import command_record

    specs = list(loras)
    if len(specs) < 2:
        raise UsageError("merge needs at least two LoRAs")
    rule = RankRule(rank=rank, energy=energy) if (rank is not None or energy is not None) else None
    out = plan_output(output, [p for p, _ in specs], dtype=dtype, overwrite=overwrite)
    with ExitStack() as stack:
        inputs = [WeightedLora(stack.enter_context(load_lora(p)), w, Path(p).name) for p, w in specs]
        result, report = merge_loras(inputs, method=method, rule=rule)  # type: ignore[arg-type]
        path = write_lora(result, out, record=command_record("merge", result, {
            "loras": [{"lora": p, "weight": w} for p, w in specs], "method": method, "rank": rank, "energy": energy,
            "output": output, "dtype": dtype}))
    data: dict[str, object] = {"output": str(path), "method": method, "modules": len(result.modules)}
    line = f"Wrote {safe_text(path)}: {len(result.modules)} modules merged ({method})"
    if report is not None:
        data.update(report.to_dict())
        line += (f", retained energy {report.retained_energy:.2%}, "
                 f"largest relative error {report.max_relative_error:.3g}")
    emit(data, as_json, [line + "."])
