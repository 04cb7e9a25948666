"""File hashes: the sha256 of a whole file, of safetensors headers, of the tensor data alone, and the
AutoV2 short hash model sites show. Standard library only."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

from lora_tools.errors import UsageError
from lora_tools.io.remote import open_read

__all__ = ["autov2_hash", "header_sha256", "sha256_file", "sha256_file_and_tensors"]

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def sha256_file(path: Path, *, chunk: int = 16 << 20) -> str:
    """Return the sha256 of a file as lower-case hex, reading it in ``chunk``-byte pieces."""
    digest = hashlib.sha256()
    buf = bytearray(max(1, chunk))
    view = memoryview(buf)
    with open_read(path) as f:
        while n := f.readinto(view):
            digest.update(view[:n])
    return digest.hexdigest()


def autov2_hash(sha256: str) -> str:
    """Return the A1111/Civitai "AutoV2" short hash: the first 10 hex characters of the sha256 (lower case).

    Raises:
        [`UsageError`]: ``sha256`` is not 64 hex characters.
    """
    if not _SHA256.fullmatch(sha256.strip()):
        raise UsageError(f"Not a sha256 hex digest: {sha256!r}.")
    return sha256.strip().lower()[:10]


def header_sha256(files: Sequence[Path]) -> str:
    """sha256 over the JSON headers of safetensors ``files``, in order (how fuse's record and verify's
    ``report.json`` name a model without hashing gigabytes)."""
    digest = hashlib.sha256()
    for f in files:
        with open_read(f) as fh:
            n = int.from_bytes(fh.read(8), "little")
            digest.update(fh.read(n))
    return digest.hexdigest()


def sha256_file_and_tensors(path: Path) -> tuple[str, str]:
    """The sha256 of a safetensors file, and the sha256 of its tensor data alone (after the header)."""
    full, tensors = hashlib.sha256(), hashlib.sha256()
    with open_read(path) as f:
        head = f.read(8)
        n = int.from_bytes(head, "little")
        header = f.read(n)
        full.update(head + header)
        while chunk := f.read(16 << 20):
            full.update(chunk)
            tensors.update(chunk)
    return full.hexdigest(), tensors.hexdigest()
