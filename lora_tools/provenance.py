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
from pathlib import Path
from typing import Any, Mapping, Protocol

LORATOOL_METADATA_KEY = "loratool"
#: Metadata keys a derived LoRA must not inherit (they describe the input's own tensors/record).
_STALE_KEYS = ("loratool", "lora_adapter_metadata", "sshs_model_hash", "sshs_legacy_hash")


class LoraFile(Protocol):
    """What a source entry reads of an input LoRA (a :class:`~lora_tools.lora.adapter.LoraAdapter`)."""

    @property
    def path(self) -> "str | os.PathLike[str] | None": ...

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
    from lora_tools import __version__

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
    name = Path(adapter.path).name if adapter.path is not None else "(in memory)"
    entry: dict[str, Any] = {"role": role, "name": name, "format": adapter.format}
    if adapter.path is not None and Path(adapter.path).is_file():
        from lora_tools.io.hashing import sha256_file

        entry["sha256"] = sha256_file(Path(adapter.path))
    entry.update(extra)
    return entry
