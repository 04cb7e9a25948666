"""The recipe that made a file, derived from its ``loratool`` record.

Works for files made by ``loratool run`` and by the plain commands: every operation records its
run entry (every option, each input's option, name and sha256), which
:func:`lora_tools.provenance.recipe_from_record` turns back into a recipe. Inputs are named by their
file names (relative to the recipe's folder; pass others with ``--set NAME=PATH``) and pinned by
sha256; ``created`` is the record's, so running the recipe again writes the same bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_tools.errors import RecipeError
from lora_tools.io.safetensors import read_header
from lora_tools.ops.registry import OPS
from lora_tools.provenance import dump_recipe, read_record, recipe_from_record


def recipe_of_file(path: str | Path) -> dict[str, Any]:
    """The recipe that made ``path`` (see :func:`lora_tools.provenance.recipe_from_record`), its options
    listed in the order the operation declares them.

    Raises:
        [`InvalidFileError`]: not a safetensors file.
        [`RecipeError`]: the file has no ``loratool`` record, or one no recipe can rebuild.
    """
    header = read_header(path)
    record = read_record(header.metadata)
    if record is None:
        raise RecipeError("no loratool record: it was not made by loratool", location=str(path))
    kind = "checkpoint" if any(k.startswith("model.diffusion_model.") for k in header.tensors) else "unet"
    order = {name: list(op.options_model.model_fields) for name, op in OPS.items()}
    return recipe_from_record(record, path, kind, field_order=order)


__all__ = ["recipe_from_record", "recipe_of_file", "dump_recipe"]
