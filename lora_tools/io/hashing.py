"""File hashes: the sha256 of a whole file, of safetensors headers, of the tensor data alone, the
AutoV2 short hash model sites show, and the xxh3-128 of the tensor data that a big output records
in its own header (:data:`DATA_HASH_KEY`)."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lora_tools.errors import UsageError
from lora_tools.io.remote import head, is_url, open_read

__all__ = ["DATA_HASH_FORMAT", "DATA_HASH_KEY", "FULL_HASH_MAX_BYTES", "autov2_hash", "data_hasher", "file_pin", "header_sha256", "sampled_sha256", "sha256_file",
           "sha256_file_and_tensors"]

#: Files up to this size are pinned by their full sha256 in records (and outputs up to it hashed
#: while written). Above it the full hash is left to whoever asks: sha256 runs at 1 to 1.7 GB/s
#: per core, so a 7 GB checkpoint costs 4 to 7 s of CPU, as much as a whole fuse on 2 cores.
FULL_HASH_MAX_BYTES = 2 << 30
#: :func:`sampled_sha256` reads this many bytes at every multiple of the stride (and the last ones).
SAMPLE_BYTES = 64 << 10
SAMPLE_STRIDE = 16 << 20
_MAX_HEADER = 100 << 20

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")

#: Metadata key of the xxh3-128 (32 lower-case hex digits) of a file's tensor data: every byte after
#: the header, in file order. An output that is not sha256-hashed while written (over
#: :data:`FULL_HASH_MAX_BYTES`, unless asked) records it in its own header; ``check`` verifies it.
#: xxh3 runs at ~14 GB/s per core (sha256: 1 to 1.7), so a 7 GB output costs half a second of CPU.
#: It detects accidental change (a damaged copy or download), not a deliberate one.
DATA_HASH_KEY = "lora_tools.data_xxh3_128"
DATA_HASH_FORMAT = re.compile(r"[0-9a-f]{32}")


def data_hasher() -> Any:
    """A fresh xxh3-128 hasher (``update``, ``hexdigest``) for :data:`DATA_HASH_KEY`."""
    import xxhash

    return xxhash.xxh3_128()


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


def sampled_sha256(path: Path) -> str:
    """A cheap content fingerprint of a big file: the sha256 of its size, its safetensors header
    (when it has one) and :data:`SAMPLE_BYTES` at every :data:`SAMPLE_STRIDE` plus its last bytes
    (about 0.4 % of the file). Any re-save, fine-tune or changed metadata changes it; an edit of a
    few bytes between the samples does not (:func:`sha256_file` sees every byte)."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        digest.update(size.to_bytes(8, "little"))
        head = os.pread(f.fileno(), 8, 0)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        if 0 < n <= min(_MAX_HEADER, size - 8):
            digest.update(os.pread(f.fileno(), n, 8))
        offsets = list(range(0, size, SAMPLE_STRIDE)) + [max(0, size - SAMPLE_BYTES)]
        for at in offsets:
            digest.update(os.pread(f.fileno(), SAMPLE_BYTES, at))
    return digest.hexdigest()


def file_pin(path: Path, *, full: bool | None = None, sha256: Callable[[Path], str] = sha256_file) -> dict[str, object]:
    """How a record pins an input file: ``{"sha256"}`` (the whole file's) when it is at most
    :data:`FULL_HASH_MAX_BYTES` or ``full`` is asked; else ``{"size", "sampled_sha256"}``
    (:func:`sampled_sha256`: milliseconds instead of seconds per GB; for an object, ``{"size", "etag"}``,
    the store's content tag). ``sha256`` computes the full
    hash (e.g. one already computed in the background)."""
    info = head(path) if is_url(path) else None  # an object: one HEAD gives its size and its content tag
    size = int(info["size"]) if info is not None else path.stat().st_size
    if full or (full is None and size <= FULL_HASH_MAX_BYTES):
        return {"sha256": sha256(path)}
    if info is not None:  # the store's own content tag instead of hundreds of ranged reads
        return {"size": size, "etag": info.get("etag")}
    return {"size": size, "sampled_sha256": sampled_sha256(path)}
