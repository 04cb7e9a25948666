"""``loratool resize``: reduce a LoRA's rank by optimal truncated SVD, reporting what it lost."""

from __future__ import annotations

import click

from lora_tools.cli._options import emit, output_options
from lora_tools.cli._output import safe_text
from lora_tools.cli._types import FRACTION, RANK, SV_RATIO
from lora_tools.units import format_bytes


@click.command("resize")
@click.argument("lora", type=click.Path(readable=False, path_type=str))
@click.option("--rank", type=RANK, help="Fixed target rank.")
@click.option("--energy", type=FRACTION,
              help="Keep the smallest rank retaining this fraction of each module's energy, (0, 1].")
@click.option("--sv-ratio", type=SV_RATIO, help="Keep singular values >= s_max / X (kohya's sv_ratio).")
@click.option("--sv-fro", type=FRACTION,
              help="Keep the smallest rank retaining this fraction of the Frobenius norm (kohya's sv_fro).")
@click.option("--conv-rank", type=RANK, help="Fixed rank for kxk convolutions (default: the main rule).")
@output_options
def resize_command(lora: str, rank: int | None, energy: float | None, sv_ratio: float | None, sv_fro: float | None,
                   conv_rank: int | None, output: str, overwrite: bool, dtype: str, as_json: bool) -> None:
    """Reduce LORA's rank (fixed or dynamic) through its factors and report the retained energy.

    \b
    Example:
        loratool resize lightning.safetensors --rank 16 -o lightning-r16.safetensors
        loratool resize style.safetensors --energy 0.99 -o style-small.safetensors
    """
    from lora_tools.lora.load import load_lora
    from lora_tools.lora.lowrank import RankRule
    from lora_tools.ops.lora_write import plan_output, tensor_bytes, write_lora
    from lora_tools.ops.resize import resize_lora
    from lora_tools.recipes.lora_jobs import command_record

    rule = RankRule(rank=rank, energy=energy, sv_ratio=sv_ratio, sv_fro=sv_fro)
    conv_rule = RankRule(rank=conv_rank) if conv_rank is not None else None
    out = plan_output(output, [lora], dtype=dtype, overwrite=overwrite)
    with load_lora(lora) as adapter:
        result, report = resize_lora(adapter, rule, conv_rule=conv_rule)
        report.size_bytes = tensor_bytes(result, out.dtype)
        path = write_lora(result, out, record=command_record("resize", result, {
            "lora": lora, "rank": rank, "energy": energy, "sv_ratio": sv_ratio, "sv_fro": sv_fro,
            "conv_rank": conv_rank, "output": output, "dtype": dtype}))
    worst = max(report.modules, key=lambda m: m.relative_error, default=None)
    lines = [f"Wrote {safe_text(path)} ({format_bytes(report.size_bytes)}): {len(report.modules)} modules, "
             f"retained energy {report.retained_energy:.2%}, largest relative error {report.max_relative_error:.3g}"
             + (f" ({safe_text(worst.name)})" if worst else "") + "."]
    emit({"output": str(path), **report.to_dict()}, as_json, lines)
