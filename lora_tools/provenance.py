"""What lora_tools records in the files it writes, and reads back.

Every output carries the base's own metadata, SAI ``modelspec.*`` keys, and one ``loratool``
key holding JSON: the operation, its sources (with sha256 and strength), and the sampler
settings the result needs, so ``verify`` and people can read them back.

Example of the ``loratool`` value::

    {"version": "0.1.0", "operation": "fuse", "method": "lora", "lightning_steps": 4,
     "sources": [{"role": "base", "name": "juggernaut.safetensors", "sha256": "..."},
                 {"role": "lora", "name": "sdxl_lightning_4step_lora.safetensors", "sha256": "...",
                  "strength": 1.0, "preset": "lightning-4step"}],
     "sampler": {"scheduler": "EulerDiscreteScheduler", "timestep_spacing": "trailing", "steps": 4, ...},
     "output_dtype": "F16", "created": "2026-11-25T23:59:00Z"}
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

LORATOOL_METADATA_KEY = "loratool"
#: Metadata keys a derived LoRA must not inherit (they describe the input's own tensors/record).
_STALE_KEYS = ("loratool", "lora_adapter_metadata", "sshs_model_hash", "sshs_legacy_hash")


class LoraFile(Protocol):
    """What a source entry reads of an input LoRA (a :class:`~lora_tools.lora.adapter.LoraAdapter`)."""

    @property
    def path(self) -> str | os.PathLike[str] | None: ...

    @property
    def format(self) -> str: ...


def utc_now() -> str:
    """The record's timestamp format (UTC, seconds)."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_record(operation: str, *, sources: list[dict[str, Any]], params: Mapping[str, Any] | None = None,
                 sampler: Mapping[str, Any] | None = None, preset: str | None = None,
                 created: str | None = None, **extra: Any) -> dict[str, Any]:
    """The ``loratool`` record of one operation: the one place every writer builds it.

    Args:
        operation: the verb (``fuse``, ``rescale``, ``merge``, ``convert``, ``save`` ...).
        sources: one entry per input (``role``, ``name``, ``sha256`` where known, ``strength`` ...).
        params: every option of the operation that shaped the output.
        sampler: the sampler settings the output needs (``SamplerSettings.to_dict()``).
        preset: the acceleration preset baked in (``lightning-4step``), if any.
        extra: further top-level fields (kept for the fuse record's own fields).
    """
    from lora_tools._version import __version__

    record: dict[str, Any] = {"version": __version__, "operation": operation, "sources": list(sources),
                              "created": created or utc_now()}
    if params:
        record["params"] = dict(params)
    if sampler is not None:
        record["sampler"] = dict(sampler)
    if preset is not None:
        record["preset"] = preset
    record.update(extra)
    return record


def with_record(metadata: Mapping[str, str], record: Mapping[str, Any]) -> dict[str, str]:
    """A copy of ``metadata`` with ``record`` as its ``loratool`` entry (JSON, sorted keys)."""
    out = dict(metadata)
    out[LORATOOL_METADATA_KEY] = json.dumps(record, sort_keys=True)
    return out


def read_record(metadata: Mapping[str, str]) -> dict[str, Any] | None:
    """The parsed ``loratool`` record of a file's metadata (the one reader every command uses), or
    ``None`` when absent or unreadable."""
    raw = metadata.get(LORATOOL_METADATA_KEY)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def fused_preset(metadata: Mapping[str, str]) -> str | None:
    """Name of the acceleration preset lora_tools baked into a file (new ``preset`` field, or an
    old record's ``lightning_steps``), or ``None``."""
    record = read_record(metadata)
    if not record:
        return None
    preset = record.get("preset")
    if isinstance(preset, str) and preset:
        return preset
    steps = record.get("lightning_steps")
    return f"lightning-{steps}step" if isinstance(steps, int) and steps else None


def derived_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """The input's metadata without what describes the input's own tensors (hashes, records)."""
    return {k: v for k, v in metadata.items() if k not in _STALE_KEYS}


def source_entry(adapter: LoraFile, role: str = "lora", **extra: Any) -> dict[str, Any]:
    """A provenance ``sources`` entry for an input LoRA."""
    from lora_tools.io.remote import as_path

    name = as_path(adapter.path).name if adapter.path is not None else "(in memory)"
    entry: dict[str, Any] = {"role": role, "name": name, "format": adapter.format}
    if adapter.path is not None and as_path(adapter.path).is_file():
        from lora_tools.io.hashing import sha256_file

        entry["sha256"] = sha256_file(as_path(adapter.path))
    entry.update(extra)
    return entry


def _paths_of(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [value["lora"]] if "lora" in value else []
    if isinstance(value, list):
        return [p for v in value for p in _paths_of(v)]
    return []


def _named(value: Any) -> Any:
    """An option value with absolute paths replaced by their file names."""

    if isinstance(value, str) and Path(value).is_absolute():
        return Path(value).name
    if isinstance(value, dict):
        return {k: _named(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_named(v) for v in value]
    return value


def _file_names(value: Any) -> Any:
    """A path option's value with every path replaced by its file name (``loras`` items too)."""

    if isinstance(value, str):
        return Path(value).name
    if isinstance(value, dict):
        return {k: (Path(v).name if k == "lora" and isinstance(v, str) else v) for k, v in value.items()}
    if isinstance(value, list):
        return [_file_names(v) for v in value]
    return value


def operation_entry(operation: str, options: Mapping[str, Any], input_keys: tuple[str, ...] | list[str],
                    path_keys: tuple[str, ...] | list[str] = (),
                    output_keys: tuple[str, ...] | list[str] = (), *, full_hash: bool | None = None,
                    sha256: Callable[[Path], str] | None = None) -> dict[str, Any]:
    """The self-describing entry of one run, recorded under ``recipe`` in every output's record:
    ``{"kind", "version", "options", "inputs": [{"option", "name", "sha256"}]}``.

    Options name files by their file names (never absolute paths), so an output is the same bytes
    whichever folder or executor made it; each input file is pinned by its sha256, or, over 2 GiB
    unless ``full_hash``, by its size and a sampled sha256 (:func:`lora_tools.io.hashing.file_pin`;
    folders and hub references by name only). The options naming the outputs (``output_keys``) are
    left out: a file is the same bytes whatever its name (a recipe rebuilding it names it after the file).
    :func:`recipe_from_record` turns it back into a recipe without knowing the operation.

    Args:
        operation: the verb.
        options: every option (``model_dump()`` of its options model); paths as given.
        input_keys: the options naming the files it reads, in order.
        path_keys: every option naming a file or folder (recorded by file name).
        full_hash: ``True``: every input file's full sha256, whatever its size.
        sha256: computes a file's sha256 (default :func:`~lora_tools.io.hashing.sha256_file`; e.g. the
            hashes a plan already computed in the background).
    """

    from lora_tools._version import __version__
    from lora_tools.io.hashing import file_pin, sha256_file
    from lora_tools.io.remote import as_path

    inputs = []
    for key in input_keys:
        for p in _paths_of(options.get(key)):
            path = as_path(p)
            entry: dict[str, Any] = {"option": key, "name": path.name}
            if path.is_file():
                entry.update(file_pin(path, full=full_hash, sha256=sha256 or sha256_file))
            inputs.append(entry)
    named = {k: (_file_names(v) if k in path_keys else _named(v))
             for k, v in options.items() if k not in output_keys}
    return {"kind": operation, "version": __version__, "options": named, "inputs": inputs}


def stamped(record: Mapping[str, Any] | None, entry: Mapping[str, Any], created: str | None) -> dict[str, Any]:
    """An operation's record with its run's entry (under ``recipe``) and, if given, the ``created`` time."""
    out = dict(record or {})
    out["recipe"] = dict(entry)
    if created is not None:
        out["created"] = created
    return out


#: The record's ``output_dtype`` -> the ``dtype`` option that wrote it (records of earlier fuses).
_DTYPES = {"keep": "keep", "F16": "fp16", "BF16": "bf16", "F32": "fp32"}


class _NoRecipe(Exception):
    """The record cannot be turned into a recipe (the message says why)."""


def _input(entry: Mapping[str, Any]) -> Any:
    name = str(entry.get("name") or entry.get("tuned") or "")
    sha = entry.get("sha256")
    return {"path": name, "sha256": sha} if isinstance(sha, str) and len(sha) == 64 else name


def recipe_from_record(record: Mapping[str, Any], output: Any, kind: str = "checkpoint",
                       field_order: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A ``version: 1`` recipe (plain values) that rebuilds the file holding ``record``.

    The record's run entry (``recipe``: the operation, every option, each input's option, name and
    sha256) describes itself: each input becomes a recipe input named after its option (``lora``,
    ``base``, ``lora1``...), pinned by its sha256; ``created`` is the record's, so the rebuilt file
    is the same bytes. Fuse records written before fuses recorded their entry are read too (their
    recipe names the base, the LoRAs and the preset; variant, revision and such were not recorded).

    Args:
        record: the file's parsed ``loratool`` record.
        output: the file's path (a name for messages, and the job's name).
        kind: ``checkpoint`` or ``unet`` (which of an old fuse's outputs the file is).
        field_order: ``operation -> option names`` to list options in (default: as recorded).

    Raises:
        [`RecipeError`]: the record is not one of an operation a recipe can run.
    """

    from lora_tools.errors import RecipeError

    out = Path(output)
    op = str(record.get("operation"))
    entry = record.get("recipe")
    if isinstance(entry, dict) and entry.get("kind") == op and isinstance(entry.get("options"), dict):
        try:
            return _recipe_of_entry(record, entry, out, list((field_order or {}).get(op) or []), kind)
        except _NoRecipe as e:
            raise RecipeError(str(e), location=str(out)) from None
    if op == "fuse":
        return _old_fuse_recipe(record, out, kind)
    if op in ("rescale", "resize", "merge", "convert", "extract"):
        raise RecipeError(f"made by '{op}' without its options in the loratool record (an older loratool): "
                          "no recipe can rebuild it", location=str(out))
    raise RecipeError(f"made by '{record.get('operation')}', which recipes do not run yet", location=str(out))


def _output_name(options: Mapping[str, Any], out: Any, kind: str) -> str:
    """The ``output`` option that writes ``out``: its name, or with several fuse saves the checkpoint's
    name they are all named after (``X-unet.safetensors`` -> ``X.safetensors``)."""
    saves = options.get("saves")
    if isinstance(saves, list) and len(dict.fromkeys(saves)) > 1:
        stem = out.stem[:-len("-unet")] if kind == "unet" and out.stem.endswith("-unet") else out.stem
        return f"{stem}.safetensors"
    return str(out.name)


def _recipe_of_entry(record: Mapping[str, Any], entry: Mapping[str, Any], out: Any, order: list[str],
                     kind: str) -> dict[str, Any]:
    import copy

    op = str(entry["kind"])
    options: dict[str, Any] = copy.deepcopy(dict(entry["options"]))
    inputs: dict[str, Any] = {}
    seen: dict[str, int] = {}
    for e in entry.get("inputs") or []:
        option = str(e.get("option"))
        value = options.get(option)
        i = seen.get(option, 0)
        seen[option] = i + 1
        if isinstance(value, str) and i == 0:
            if Path(value).name != e.get("name"):
                raise _NoRecipe(f"its loratool record's recipe entry does not list input '{value}'")
            inputs[option] = _input(e)
            options[option] = option
        elif isinstance(value, list) and i < len(value):
            key = f"{option[:-1] if option.endswith('s') else option}{i + 1}"
            item = value[i]
            name = item.get("lora") if isinstance(item, dict) else item
            if not isinstance(name, str) or Path(name).name != e.get("name"):
                raise _NoRecipe(f"its loratool record's recipe entry does not list input '{name}'")
            inputs[key] = _input(e)
            if isinstance(item, dict):
                item["lora"] = key
            else:
                value[i] = key
        else:
            raise _NoRecipe(f"its loratool record's recipe entry does not list input '{e.get('name')}'")
    options["output"] = _output_name(options, out, kind)
    ordered = [k for k in order if k in options] + [k for k in options if k not in order]
    options = {k: options[k] for k in ordered if options[k] is not None}
    name = out.stem if out.stem not in inputs else f"{out.stem}-job"
    recipe: dict[str, Any] = {"version": 1}
    if record.get("created"):
        recipe["created"] = record["created"]
    recipe.update({"output_dir": ".", "inputs": inputs, "jobs": [{"name": name, op: options}]})
    return recipe


def _old_fuse_recipe(record: Mapping[str, Any], out: Any, kind: str) -> dict[str, Any]:
    """The recipe of a fuse recorded before fuses recorded their run entry (lossy: its sources only)."""
    from lora_tools.errors import RecipeError

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
        preset = record.get("preset") or diffs[0].get("preset")
        inputs["preset_dir"] = {"path": "."}
        fuse.update({"preset": preset} if isinstance(preset, str) and preset
                    else {"lightning": record.get("lightning_steps")})
        fuse.update({"method": "unet", "strength": float(diffs[0].get("strength", 1.0)), "preset_dir": "preset_dir"})
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


def dump_recipe(recipe: Mapping[str, Any]) -> str:
    """YAML text of a recipe, keys in recipe order."""
    import yaml

    return yaml.safe_dump(dict(recipe), sort_keys=False, default_flow_style=False, allow_unicode=True)
