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

import json
from typing import Any, Mapping

LORATOOL_METADATA_KEY = "loratool"


def read_provenance(metadata: Mapping[str, str]) -> dict[str, Any] | None:
    """The parsed ``loratool`` record of a file's metadata, or ``None`` when absent or unreadable."""
    raw = metadata.get(LORATOOL_METADATA_KEY)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def fused_lightning_steps(metadata: Mapping[str, str]) -> int | None:
    """The Lightning step count lora_tools already fused into a file, if any."""
    record = read_provenance(metadata)
    if not record:
        return None
    steps = record.get("lightning_steps")
    return int(steps) if isinstance(steps, int) else None
