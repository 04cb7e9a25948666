"""Helpers shared by the LoRA and checkpoint analyses: file facts, metadata grouping, counting."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lora_tools.errors import InvalidFileError
from lora_tools.io.remote import is_url
from lora_tools.io.sources import SafetensorsSource, StateDictSource
from lora_tools.ops.inspect.report import Container, FileSummary, MetadataSummary, TensorEntry

#: Files at least this big are hashed only when asked (``with_hash=True``).
HASH_LIMIT_BYTES = 2 << 30
#: kohya ``ss_*`` keys shown with their value; the others are listed by name.
KOHYA_KEYS = (
    "ss_output_name", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
    "ss_base_model_version", "ss_sd_model_name", "ss_v2", "ss_training_comment", "ss_resolution",
    "ss_num_epochs", "ss_max_train_steps", "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr",
    "ss_optimizer", "ss_mixed_precision", "ss_training_started_at", "ss_training_finished_at",
)
_MAX_VALUE_CHARS = 200


def tensor_entry(src: SafetensorsSource | StateDictSource, key: str) -> TensorEntry:
    m = src.meta(key)
    return TensorEntry(key, m.dtype, tuple(m.shape))


def file_summary(path: Path, container: Container, with_hash: bool | None) -> FileSummary:
    size = path.stat().st_size
    sha = autov2 = None
    if with_hash or (with_hash is None and size < HASH_LIMIT_BYTES and not is_url(path)):  # an object: header only
        from lora_tools.io.hashing import autov2_hash, sha256_file

        sha = sha256_file(path)
        autov2 = autov2_hash(sha)
    return FileSummary(str(path), path.name, container, size, sha, autov2)


def summarise_metadata(metadata: Mapping[str, str]) -> MetadataSummary:
    kohya = {k: _shorten(metadata[k]) for k in KOHYA_KEYS if k in metadata}
    kohya_other = tuple(sorted(k for k in metadata if k.startswith("ss_") and k not in kohya))
    modelspec = {k: _shorten(v) for k, v in sorted(metadata.items()) if k.startswith("modelspec.")}
    other = {k: _shorten(v) for k, v in sorted(metadata.items())
             if not k.startswith(("ss_", "modelspec.")) and k != "loratool"}
    return MetadataSummary(kohya, kohya_other, modelspec, other)


def _shorten(value: str) -> str:
    value = str(value)
    if len(value) <= _MAX_VALUE_CHARS:
        return value
    return f"{value[:_MAX_VALUE_CHARS]}... ({len(value)} chars)"


def numel_sum(entries: Iterable[TensorEntry]) -> int:
    return sum(math.prod(e.shape) for e in entries)


def count(items: Iterable[str]) -> dict[str, int]:
    return dict(Counter(items).most_common())


def fmt_num(x: float) -> str:
    return f"{x:g}"


def natural(s: str) -> list[object]:
    return [(0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", s) if t]


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InvalidFileError(f"'{path}' is not readable JSON ({e}).") from e
    if not isinstance(data, dict):
        raise InvalidFileError(f"'{path}' is not a JSON object.")
    return data
