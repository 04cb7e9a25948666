"""Whether a safetensors file is complete and internally consistent.

The header rules are those of the safetensors library (see
:func:`lora_tools.io.safetensors.read_header`): the data section is exactly as long as the tensors
the header lists. A ``loratool`` record, where present, must be readable; a LoRA's factors must
fit each other (:func:`lora_tools.lora.validate.check_factor_shapes`). With ``hash_data`` every
tensor is read once, in file order: the file's sha256 comes out of the same pass, and float
tensors holding NaN or Inf are named.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_tools.errors import InvalidFileError, LoraToolsError
from lora_tools.io.hashing import DATA_HASH_FORMAT, DATA_HASH_KEY, data_hasher
from lora_tools.io.magnitudes import largest_magnitude, tensor_largest_magnitude
from lora_tools.io.safetensors import DTYPE_SIZES, SafetensorsHeader, TensorFile, is_float_dtype, read_header
from lora_tools.provenance import LORATOOL_METADATA_KEY, read_record

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class CheckResult:
    """The verdict on one file.

    Attributes:
        path: the file checked.
        problems: one line per problem, each naming the file; empty when the file is sound.
        size_bytes: the file's size (``None`` when it could not be read).
        tensors: how many tensors its header lists (``None`` when the header is invalid).
        record: the parsed ``loratool`` record, or ``None`` when the file has none.
        sha256: the file's sha256, when ``hash_data`` was asked and the header is valid.
        data_checked: whether every tensor's bytes were read (``hash_data``).
        data_xxh3_128: the xxh3-128 of the tensor data that the file records in its header
            (:data:`~lora_tools.io.hashing.DATA_HASH_KEY`), once ``hash_data`` found the data matches it.
    """

    path: Path
    problems: list[str] = field(default_factory=list)
    size_bytes: int | None = None
    tensors: int | None = None
    record: dict[str, Any] | None = None
    sha256: str | None = None
    data_checked: bool = False
    data_xxh3_128: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``loratool check --json``)."""
        return {"path": str(self.path), "ok": self.ok, "problems": list(self.problems), "size_bytes": self.size_bytes,
                "tensors": self.tensors, "record": self.record, "sha256": self.sha256, "data_checked": self.data_checked,
                "data_xxh3_128": self.data_xxh3_128}


def check_file(path: str | os.PathLike[str], *, hash_data: bool = False,
               progress: Callable[[int], None] | None = None) -> CheckResult:
    """Check that ``path`` is a complete, internally consistent safetensors file.

    Never raises for a bad file: every problem is a line of the result (so a batch of files is
    checked to the end). Nothing is written.

    Args:
        path: the file.
        hash_data: also read every tensor: the whole-file sha256, short reads, NaN/Inf in float
            tensors, and the data's xxh3-128 where the header records one (one pass over the file).
        progress: called with the number of bytes read, as they are read (``hash_data`` only).

    Returns:
        The :class:`CheckResult`.

    Example:
        >>> result = check_file("juggernaut-lightning-4step.safetensors", hash_data=True)
        >>> result.ok, result.sha256[:12]
        (True, '6c1f2a9b0e3d')
    """
    result = CheckResult(Path(path))
    try:
        header = read_header(path)
    except LoraToolsError as e:
        result.problems.append(e.render())
        return result
    result.size_bytes, result.tensors = header.file_size, len(header.tensors)
    _check_record(header, result)
    _check_lora_factors(header, result)
    if hash_data:
        _check_data(header, result, progress)
    return result


def _check_record(header: SafetensorsHeader, result: CheckResult) -> None:
    if LORATOOL_METADATA_KEY not in header.metadata:
        return
    record = read_record(header.metadata)
    if record is None:
        result.problems.append(f"'{header.path}': its '{LORATOOL_METADATA_KEY}' record is not a JSON object.")
        return
    result.record = record
    sources = record.get("sources", [])
    if not isinstance(sources, list) or not all(isinstance(s, dict) for s in sources):
        result.problems.append(f"'{header.path}': its '{LORATOOL_METADATA_KEY}' record has no list of sources.")
        return
    for s in sources:
        digest = s.get("sha256")
        if digest is not None and not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
            result.problems.append(f"'{header.path}': its record's sha256 of source {s.get('name')!r} is not "
                                   f"64 hex digits.")


def _check_lora_factors(header: SafetensorsHeader, result: CheckResult) -> None:
    """A LoRA's factors must fit each other (up's rank is down's ...); other files have none."""
    from lora_tools.io.sources import SafetensorsSource
    from lora_tools.lora.load import load_lora
    from lora_tools.lora.validate import check_factor_shapes

    try:
        adapter = load_lora(header.path, source=SafetensorsSource(header.path, header))
    except LoraToolsError:
        return  # not a LoRA (a checkpoint, an embedding...): nothing to fit
    with adapter:
        for problem in check_factor_shapes(adapter):
            result.problems.append(f"'{header.path}': the factors of {problem.describe()}.")


def _check_data(header: SafetensorsHeader, result: CheckResult, progress: Callable[[int], None] | None) -> None:
    digest = hashlib.sha256()
    recorded = header.metadata.get(DATA_HASH_KEY)
    data_digest = data_hasher() if recorded is not None else None
    try:
        with open(header.path, "rb") as f:
            digest.update(f.read(header.data_start))
        with TensorFile(header.path, header) as tf:
            # The tensors tile the data section in offset order, so this is the whole file.
            for info in sorted(header.tensors.values(), key=lambda t: (t.begin, t.end)):
                buf = tf.read_bytes(info.name)
                digest.update(buf)
                if data_digest is not None:
                    data_digest.update(buf)
                if is_float_dtype(info.dtype) and info.dtype in DTYPE_SIZES and info.numel and not _finite(buf, info):
                    result.problems.append(f"'{header.path}': tensor '{info.name}' holds NaN or Inf values.")
                if progress is not None:
                    progress(info.nbytes)
    except InvalidFileError as e:
        result.problems.append(e.render())
        return
    except OSError as e:
        result.problems.append(f"'{header.path}' cannot be read: {e.strerror or e}.")
        return
    result.sha256, result.data_checked = digest.hexdigest(), True
    if data_digest is not None:
        _check_data_hash(header, str(recorded), data_digest.hexdigest(), result)


def _check_data_hash(header: SafetensorsHeader, recorded: str, actual: str, result: CheckResult) -> None:
    """The data's xxh3-128 against the one its writer recorded (the recorded text is not echoed: untrusted)."""
    if not DATA_HASH_FORMAT.fullmatch(recorded):
        result.problems.append(f"'{header.path}': its '{DATA_HASH_KEY}' is not an xxh3-128 (32 lower-case hex digits).")
    elif recorded != actual:
        result.problems.append(f"'{header.path}': its tensor data does not match the xxh3-128 recorded in it when it "
                               f"was written (the data's is {actual}): the file changed after it was written.")
    else:
        result.data_xxh3_128 = actual


def _finite(buf: bytearray, info: Any) -> bool:
    largest = largest_magnitude(buf, info.dtype)  # from the bits, no torch
    if largest is not None:
        return math.isfinite(largest)
    from lora_tools.io.safetensors import bytes_to_tensor

    return math.isfinite(tensor_largest_magnitude(bytes_to_tensor(buf, info)))  # fp8: through torch
