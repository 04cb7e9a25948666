"""The recipe that made a file, derived from its ``loratool`` record.

Works for files made by ``loratool run`` and by the plain commands (``loratool fuse``,
``rescale``, ``resize``, ``merge``, ``convert``, ``extract``): a fuse record holds every input
(name, sha256, strength), the method, the output dtype and the time; a LoRA op's record holds the
``recipe`` entry of the equivalent job (every option, each input's name and sha256).
Inputs are named by their file names (relative to the recipe's folder; pass others with
``--set NAME=PATH``) and pinned by sha256 where the record has it; ``created`` is the
record's, so running the recipe again writes the same bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from lora_tools.errors import RecipeError
from lora_tools.provenance import read_record
from lora_tools.io.safetensors import read_header

#: Operations whose outputs a recipe rebuilds from the ``recipe`` entry of their record.
LORA_OP_KINDS = ("rescale", "resize", "merge", "convert", "extract")
_DTYPES = {"keep": "keep", "F16": "fp16", "BF16": "bf16", "F32": "fp32"}


def _input(entry: Mapping[str, Any]) -> Any:
    name = str(entry.get("name") or entry.get("tuned") or "")
    sha = entry.get("sha256")
    return {"path": name, "sha256": sha} if isinstance(sha, str) and len(sha) == 64 else name


def recipe_from_record(record: Mapping[str, Any], output: str | Path, kind: str = "checkpoint") -> dict[str, Any]:
    """A ``version: 1`` recipe (plain values) that rebuilds the file holding ``record``.

    Args:
        record: the file's parsed ``loratool`` record.
        output: the file's path (its name becomes the job's output).
        kind: ``checkpoint`` or ``unet`` (which of a fuse's outputs the file is).

    Raises:
        [`RecipeError`]: the record is not one of an operation a recipe can run.
    """
    out = Path(output)
    if record.get("operation") in LORA_OP_KINDS:
        return _lora_op_recipe(record, out)
    if record.get("operation") != "fuse":
        raise RecipeError(f"made by '{record.get('operation')}', which recipes do not run yet",
                          location=str(out))
    sources = list(record.get("sources") or [])
    base = next((s for s in sources if s.get("role") == "base"), None)
    if base is None:
        raise RecipeError("its loratool record names no base", location=str(out))
    inputs: dict[str, Any] = {"base": _input(base)}
    fuse: dict[str, Any] = {"base": "base"}
    loras: list[dict[str, Any]] = []
    for i, s in enumerate(x for x in sources if x.get("role") == "lora"):
        name = f"lora{i + 1}"
        inputs[name] = _input(s)
        loras.append({"lora": name, "strength": float(s.get("strength", 1.0))})
    diffs = [s for s in sources if s.get("role") == "unet-difference"]
    if diffs:
        steps = record.get("lightning_steps")
        inputs["lightning_dir"] = {"path": "."}
        fuse.update({"lightning": steps, "method": "unet", "strength": float(diffs[0].get("strength", 1.0)),
                     "lightning_dir": "lightning_dir"})
    if loras:
        fuse["loras"] = loras
    fuse["dtype"] = _DTYPES.get(str(record.get("output_dtype", "keep")), "keep")
    fuse["saves"] = [kind]
    fuse["output"] = out.name
    recipe: dict[str, Any] = {"version": 1}
    if record.get("created"):
        recipe["created"] = record["created"]
    recipe.update({"output_dir": ".", "inputs": inputs, "jobs": [{"name": out.stem, "fuse": fuse}]})
    return recipe


def _lora_op_recipe(record: Mapping[str, Any], out: Path) -> dict[str, Any]:
    """The recipe of a LoRA-op output, from the ``recipe`` entry its command or job recorded: the job's
    options with each input path replaced by an input named after its option (``lora``, ``tuned``,
    ``lora1``...), pinned by the recorded sha256."""
    import copy

    from lora_tools.recipes.lora_jobs import INPUT_KEYS, _options_model

    op = str(record.get("operation"))
    entry = record.get("recipe")
    if not isinstance(entry, dict) or entry.get("kind") != op or not isinstance(entry.get("options"), dict):
        raise RecipeError(f"made by '{op}' without its options in the loratool record (an older loratool): "
                          "no recipe can rebuild it", location=str(out))
    options: dict[str, Any] = copy.deepcopy(entry["options"])
    recorded = iter(entry.get("inputs") or [])
    inputs: dict[str, Any] = {}

    def pin(option: str, name: str, key: str) -> str:
        e = next(recorded, None)
        if e is None or e.get("option") != option or e.get("name") != Path(name).name:
            raise RecipeError(f"its loratool record's recipe entry does not list input '{name}'", location=str(out))
        inputs[key] = _input(e)
        return key

    for key in INPUT_KEYS[op]:
        value = options.get(key)
        if isinstance(value, str):
            options[key] = pin(key, value, key)
        elif isinstance(value, list):  # merge's loras: lora1, lora2, ...
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    item["lora"] = pin(key, item["lora"], f"lora{i + 1}")
    options["output"] = out.name
    fields = _options_model(op).model_fields
    order = [k for k in fields if k in options] + [k for k in options if k not in fields]  # the schema's order
    options = {k: options[k] for k in order if not (options[k] is None and k in fields and fields[k].default is None)}
    name = out.stem if out.stem not in inputs else f"{out.stem}-job"
    recipe: dict[str, Any] = {"version": 1}
    if record.get("created"):
        recipe["created"] = record["created"]
    recipe.update({"output_dir": ".", "inputs": inputs, "jobs": [{"name": name, op: options}]})
    return recipe


def recipe_of_file(path: str | Path) -> dict[str, Any]:
    """The recipe that made ``path`` (see :func:`recipe_from_record`).

    Raises:
        [`InvalidFileError`]: not a safetensors file.
        [`RecipeError`]: the file has no ``loratool`` record.
    """
    header = read_header(path)
    record = read_record(header.metadata)
    if record is None:
        raise RecipeError("no loratool record: it was not made by loratool", location=str(path))
    kind = "checkpoint" if any(k.startswith("model.diffusion_model.") for k in header.tensors) else "unet"
    return recipe_from_record(record, path, kind)


def dump_recipe(recipe: Mapping[str, Any]) -> str:
    """YAML text of a recipe, keys in recipe order."""
    import yaml

    return yaml.safe_dump(dict(recipe), sort_keys=False, default_flow_style=False, allow_unicode=True)


__all__ = ["recipe_from_record", "recipe_of_file", "dump_recipe"]
