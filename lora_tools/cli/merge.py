"""``loratool merge``: combine LoRAs with weights, exactly (concat) or to a target rank (svd)."""

from __future__ import annotations

from lora_tools.cli._generate import json_option, operation_command, overwrite_option
from lora_tools.cli._options import emit
from lora_tools.cli._output import safe_text
from lora_tools.ops.registry import OPS


@operation_command(OPS["merge"], extra=[overwrite_option(), json_option()])
def merge_command(options, overwrite: bool, as_json: bool) -> None:
    """Merge LoRAs: the result at strength 1.0 is the sum of each LORA at its weight W (default 1).

    \b
    Example:
        loratool merge lightning.safetensors style.safetensors:0.6 -o both.safetensors
        loratool merge a.safetensors b.safetensors:0.5 --method svd --rank 64 -o ab.safetensors
    """
    result = OPS["merge"](options, overwrite=overwrite)
    path, report, method = result.files[0], result.report, options.method
    modules = len(result.adapter.modules) if result.adapter is not None else 0
    data: dict[str, object] = {"output": str(path), "method": method, "modules": modules}
    line = f"Wrote {safe_text(path)}: {modules} modules merged ({method})"
    if report is not None:
        data.update(report.to_dict())
        line += (f", retained energy {report.retained_energy:.2%}, "
                 f"largest relative error {report.max_relative_error:.3g}")
    emit(data, as_json, [line + "."], [path])
