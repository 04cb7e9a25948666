"""Safetensors files read and written one tensor at a time.

The header is parsed in pure Python (no torch import), so ``inspect`` starts fast. Tensors are
read with plain positional file reads (``os.pread``), never through a memory map, so the
resident memory of a process stays at the tensors it holds. :class:`StreamingWriter` writes the
header first and then each tensor's bytes in order into a temporary file next to the output,
and only an explicit :meth:`StreamingWriter.finalize` (fsync + atomic rename) makes the output
appear under its name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from lora_tools.errors import (
    InvalidFileError,
    KeyMismatchError,
    OutputError,
    OutputExistsError,
    ShapeMismatchError,
    UnsafeFileError,
    UsageError,
)
from lora_tools.io import atomic, remote
from lora_tools.io.direct import BufferedOut, open_out
from lora_tools.io.hashing import DATA_HASH_KEY, data_hasher
from lora_tools.special_files import refuse_special
from lora_tools.testing import hooks

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: Bytes per element of each safetensors dtype name.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
#: Largest header we accept (the format's own limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000
#: Friendly dtype names used on the command line and in reports.
DTYPE_ALIASES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16", "float32": "F32",
                 "float16": "F16", "bfloat16": "BF16"}


#: Bits per element of every dtype the safetensors format knows (``safetensors/src/tensor.rs``,
#: ``Dtype::bitsize``). A header naming another dtype is invalid; lora_tools reads the tensors of
#: those in :data:`DTYPE_SIZES`.
FORMAT_DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
#: How a file starts when it is a PyTorch pickle: a zip archive (``torch.save`` since 1.6) or a
#: bare pickle stream (protocol 2+ opcode ``PROTO``).
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file.

    Attributes:
        name: the tensor's key.
        dtype: safetensors dtype name (``"F16"``, ``"F32"``, ...).
        shape: the tensor's shape.
        begin: start offset of its bytes, relative to the start of the data section.
        end: end offset (exclusive), relative to the start of the data section.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True, slots=True)
class SafetensorsHeader:
    """The parsed header of a safetensors file: tensor table and ``__metadata__``."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int

    def keys(self) -> list[str]:
        return list(self.tensors)

    @property
    def data_bytes(self) -> int:
        return self.file_size - self.data_start


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file without loading any tensor.

    The rules are exactly those of the safetensors library (``SafeTensors::read_metadata`` and
    ``Metadata::validate``): an 8-byte little-endian header length within the file and at most
    100 MB; a UTF-8 JSON object (we also refuse duplicate keys, which serde would silently
    collapse); ``__metadata__`` absent, ``null`` or a string-to-string map; every other entry a
    known ``dtype``, a ``shape`` of non-negative integers and two ``data_offsets``; each tensor's
    byte span equal to its shape times its dtype size; the spans, sorted, tiling the data section
    from 0 to its last byte without gap or overlap.

    Args:
        path: the file.

    Returns:
        The tensor table, ``__metadata__`` and where the data section starts.

    Raises:
        InvalidFileError: the file is missing, unreadable, a directory, empty, truncated or
            breaks one of the rules above (the message names the file and the rule).
        UnsafeFileError: the file is a PyTorch pickle (zip or bare) under a safetensors name.
    """
    path = remote.as_path(path)
    if remote.is_url(path):
        size, head, raw = remote.header_bytes(path)
        n = _check_start(path, size, head, raw[:1] == b"{")
    else:
        size, head, raw, n = _read_local_header(path)
    if len(raw) < n:
        raise InvalidFileError(f"'{path}' is truncated: it shrank while its header was read.")
    parsed = _parse_json(path, raw)
    metadata = parsed.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        _corrupt(path, "__metadata__ must map strings to strings")
    data_start = 8 + n
    data_size = size - data_start
    tensors = {name: _parse_entry(path, name, entry) for name, entry in parsed.items()}
    end = _check_layout(path, tensors)
    if end > data_size:
        raise InvalidFileError(f"'{path}' is truncated: tensor data needs {end} bytes, the file holds {data_size}.")
    if end < data_size:
        _corrupt(path, f"{data_size - end} bytes after the last tensor's data belong to no tensor")
    return SafetensorsHeader(path, tensors, dict(metadata), data_start, size)


def _corrupt(path: Path, rule: str) -> NoReturn:
    raise InvalidFileError(f"'{path}' has a corrupt safetensors header: {rule}.")


def _quote(name: str) -> str:
    """A file-derived name for a one-line message: control characters escaped, length capped."""
    text = name.encode("unicode_escape").decode("ascii") if not name.isprintable() else name
    return repr(text[:120] + ("…" if len(text) > 120 else ""))


def _parse_json(path: Path, raw: bytes) -> dict[str, object]:
    def unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in pairs:
            if key in out:
                _corrupt(path, f"key {_quote(key)} appears twice")
            out[key] = value
        return out

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        _corrupt(path, f"not UTF-8 (byte {e.start})")
    try:
        parsed = json.loads(text, object_pairs_hook=unique)
    except json.JSONDecodeError as e:
        _corrupt(path, f"invalid JSON ({e.msg} at byte {e.pos})")
    except RecursionError:
        _corrupt(path, "invalid JSON (nested too deeply)")
    if not isinstance(parsed, dict):
        _corrupt(path, f"a JSON {type(parsed).__name__}, not an object")
    return parsed


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _parse_entry(path: Path, name: str, entry: object) -> TensorInfo:
    where = f"tensor {_quote(name)}"
    if not isinstance(entry, dict):
        _corrupt(path, f"{where} is not an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        _corrupt(path, f"{where} has no {missing[0]}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in FORMAT_DTYPE_BITS:
        _corrupt(path, f"{where} has unknown dtype {_quote(str(dtype))}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        _corrupt(path, f"{where} has shape {_quote(json.dumps(shape))}, not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(x) for x in offsets):
        _corrupt(path, f"{where} has data_offsets {_quote(json.dumps(offsets))}, not two non-negative integers")
    begin, end = offsets
    if end < begin:
        _corrupt(path, f"{where} ends (byte {end}) before it begins (byte {begin})")
    info = TensorInfo(name, dtype, tuple(shape), begin, end)
    bits = info.numel * FORMAT_DTYPE_BITS[dtype]
    if bits % 8:
        _corrupt(path, f"{where} ({dtype} {list(shape)}) does not fill whole bytes")
    if bits // 8 != info.nbytes:
        _corrupt(path, f"{where} ({dtype} {list(shape)}) needs {bits // 8} bytes, its offsets {begin}..{end} span {info.nbytes}")
    return info


def _check_layout(path: Path, tensors: Mapping[str, TensorInfo]) -> int:
    """Sorted by offsets, the spans must tile ``0..end`` exactly; returns ``end``."""
    pos, prev = 0, None
    for t in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if t.begin > pos:
            _corrupt(path, f"bytes {pos}..{t.begin} of the data section belong to no tensor (a gap before tensor {_quote(t.name)})")
        if t.begin < pos:
            assert prev is not None
            _corrupt(path, f"tensor {_quote(t.name)} (bytes {t.begin}..{t.end}) overlaps tensor {_quote(prev.name)} (bytes {prev.begin}..{prev.end})")
        pos, prev = t.end, t
    return pos


def _check_start(path: Path, size: int, head: bytes, looks_like_header: bool) -> int:
    """The header length from a file's first 8 bytes, checked against the file's size (and not a pickle)."""
    if len(head) < 8:
        what = "empty" if size == 0 else f"only {size} bytes long"
        raise InvalidFileError(f"'{path}' is {what}: not a safetensors file.")
    # A header length such as 0x0280 starts with the bytes of a pickle's PROTO opcode too: a
    # file is a pickle only when it does not go on like a safetensors header (``{``).
    if head.startswith(_PICKLE_MAGIC) and not looks_like_header:
        raise UnsafeFileError(
            f"'{path}' is a PyTorch pickle, not safetensors; lora_tools never loads a pickle in place "
            f"of a safetensors file (unpickling can run code). Convert it with a tool you trust."
        )
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES:
        raise InvalidFileError(
            f"'{path}' is not a valid safetensors file: header length {n} is over the format's "
            f"limit of {MAX_HEADER_BYTES} bytes."
        )
    if n + 8 > size:
        raise InvalidFileError(
            f"'{path}' is not a valid safetensors file: header length {n} does not fit in a {size}-byte file."
        )
    return int(n)


def _read_local_header(path: Path) -> tuple[int, bytes, bytes, int]:
    """``(size, first 8 bytes, header bytes, header length)`` of a local file."""
    if path.is_dir():
        raise InvalidFileError(f"'{path}' is a directory, not a safetensors file.")
    refuse_special(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            looks_like_header = f.read(1) == b"{"
            f.seek(8)
            n = _check_start(path, size, head, looks_like_header)
            return size, head, f.read(n), n
    except FileNotFoundError:
        raise InvalidFileError(f"'{path}' does not exist.") from None
    except PermissionError as e:
        raise InvalidFileError(f"'{path}' cannot be read: {e.strerror}.") from None
    except IsADirectoryError:
        raise InvalidFileError(f"'{path}' is a directory, not a safetensors file.") from None
    except OSError as e:
        raise InvalidFileError(f"'{path}' cannot be read: {e.strerror or e}.") from None


def torch_dtype(name: str) -> torch.dtype:
    """Map a safetensors dtype name to a torch dtype."""
    import torch

    table = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U8": torch.uint8, "BOOL": torch.bool,
        "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    }
    if name not in table:
        raise InvalidFileError(f"dtype {name} is valid in safetensors, but lora_tools cannot read its tensors.")
    return table[name]


def dtype_name(dtype: torch.dtype) -> str:
    """Map a torch dtype to its safetensors dtype name."""
    import torch

    table = {
        torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
        torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
        torch.uint8: "U8", torch.bool: "BOOL",
        torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    }
    return table[dtype]


def is_float_dtype(name: str) -> bool:
    return name in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


class TensorFile:
    """A safetensors file opened for reading single tensors by name.

    Reads use ``os.pread`` into a fresh buffer, so no page of the file is mapped into the
    process and nothing is cached between calls.

    Example:
        >>> with TensorFile("model.safetensors") as f:
        ...     w = f.tensor("model.diffusion_model.out.2.weight")
    """

    def __init__(self, path: str | os.PathLike[str], header: SafetensorsHeader | None = None):
        self.header = header or read_header(path)
        self.path = self.header.path
        # an object: ranged GETs, small tensors in windows (remote.RangeReader)
        self._remote = remote.RangeReader(self.path, self.header.file_size) if remote.is_url(self.path) else None
        self._fd: int | None = -1 if self._remote is not None else os.open(self.path, os.O_RDONLY)

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            if self._remote is None:
                os.close(self._fd)
            else:
                self._remote.close()
            self._fd = None

    def keys(self) -> list[str]:
        return self.header.keys()

    def info(self, name: str) -> TensorInfo:
        try:
            return self.header.tensors[name]
        except KeyError:
            raise KeyMismatchError(f"'{self.path}' has no tensor '{name}'.") from None

    def read_bytes(self, name: str) -> bytearray:
        """Read the raw bytes of one tensor."""
        buf = bytearray(self.info(name).nbytes)
        self.read_into(name, buf)
        return buf

    def read_into(self, name: str, buf: bytearray | memoryview) -> None:
        """Read the raw bytes of one tensor into ``buf`` (exactly its size)."""
        info = self.info(name)
        view = memoryview(buf).cast("B")
        if view.nbytes != info.nbytes:
            raise ValueError(f"buffer of {view.nbytes} bytes for '{name}' ({info.nbytes} bytes)")
        self.read_range(info.begin, view, name)

    def read_range(self, begin: int, view: memoryview, what: str) -> None:
        """Read ``view.nbytes`` bytes of the data section from ``begin`` on (one tensor, or adjacent ones: ``what``
        names them in the truncation error)."""
        assert self._fd is not None, "file is closed"
        pos, offset = 0, self.header.data_start + begin
        if self._remote is not None:
            self._remote.read_into(offset, view)
            return
        while pos < view.nbytes:
            chunk = os.preadv(self._fd, [view[pos:]], offset + pos)
            if chunk <= 0:
                raise InvalidFileError(f"'{self.path}' is truncated while reading '{what}'.")
            pos += chunk

    def tensor(self, name: str) -> torch.Tensor:
        """Read one tensor (a fresh CPU tensor that owns its memory)."""
        info = self.info(name)
        if info.dtype not in DTYPE_SIZES:
            raise InvalidFileError(f"'{self.path}': tensor {_quote(name)} is {info.dtype}, a dtype lora_tools cannot read.")
        return bytes_to_tensor(self.read_bytes(name), info)


def bytes_to_tensor(buf: bytearray | memoryview, info: TensorInfo) -> torch.Tensor:
    """A tensor over ``buf``'s memory (which must be aligned for the dtype)."""
    import torch

    dtype = torch_dtype(info.dtype)
    if info.numel == 0:
        return torch.empty(info.shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)


def tensor_to_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor (no copy when already contiguous)."""
    import torch

    t = t.detach().contiguous().cpu().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    # numpy's stubs do not declare the buffer protocol that ndarray implements
    return memoryview(t.view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class TensorPlan:
    """One tensor an output file will hold: name, dtype name and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for d in self.shape:
            n *= d
        return n


def build_header(plans: Iterable[TensorPlan], metadata: Mapping[str, str] | None) -> tuple[bytes, list[TensorPlan]]:
    """Encode a safetensors header for tensors written in the given order (8-byte aligned)."""
    entries: dict[str, object] = {}
    if metadata:
        entries["__metadata__"] = dict(metadata)
    ordered = list(plans)
    offset = 0
    for p in ordered:
        entries[p.name] = {"dtype": p.dtype, "shape": list(p.shape), "data_offsets": [offset, offset + p.nbytes]}
        offset += p.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((8 - (len(raw) + 8) % 8) % 8)
    return struct.pack("<Q", len(raw)) + raw, ordered


@dataclass
class StreamingWriter:
    """Write a safetensors file tensor by tensor, in the planned order, atomically.

    The header is written first from the plan; each :meth:`write` appends one tensor's bytes to
    a temporary file next to the output (``.<name>.<pid>-<n>.loratool.partial``, created with the
    permissions a plain file creation gives under the umask). Nothing appears under ``path``
    until :meth:`finalize` (:meth:`complete`: fsync and header re-check; then :meth:`commit`: the
    rename); leaving the ``with`` block any other way (error, Ctrl-C) removes the temporary file.
    Every OS failure becomes one :class:`~lora_tools.errors.OutputError` line naming the path.

    Args:
        path: the output file.
        plans: the tensors, in writing order.
        metadata: the header's ``__metadata__``.
        hash: sha256 the file while it is written (:attr:`sha256`).
        data_hash: record the xxh3-128 of the tensor data in the header's metadata
            (:data:`~lora_tools.io.hashing.DATA_HASH_KEY`, written last; :attr:`data_xxh3_128`), for
            files whose sha256 is not taken (a sha256 pins the whole file, header included; objects
            are uploaded part by part and get neither).
        direct: O_DIRECT: ``None`` = for big files where the file system allows it.
        overwrite: replace an existing ``path`` (last finisher wins); ``False`` claims the name
            atomically and fails if another run took it meanwhile.
        verify: after writing, read the data back and check its sha256 (one more pass).

    Example:
        >>> plan = [TensorPlan("w", "F16", (2, 2))]
        >>> with StreamingWriter("out.safetensors", plan, {"format": "pt"}) as w:
        ...     w.write("w", torch.zeros(2, 2, dtype=torch.float16))
        ...     w.finalize()
    """

    path: Path
    plans: list[TensorPlan]
    metadata: Mapping[str, str] | None = None
    hash: bool = False
    data_hash: bool = False
    direct: bool | None = None  # O_DIRECT: None = for big files where the filesystem allows it
    overwrite: bool = True
    verify: bool = False
    _out: BufferedOut | remote.ObjectWriter | None = field(default=None, init=False, repr=False)
    _tmp: Path | None = field(default=None, init=False, repr=False)
    _index: int = field(default=0, init=False, repr=False)
    _done: bool = field(default=False, init=False, repr=False)
    _complete: bool = field(default=False, init=False, repr=False)
    _dev: int = field(default=-1, init=False, repr=False)

    def __post_init__(self) -> None:
        self.path = remote.as_path(self.path)
        if self.verify:
            self.hash = True
        self.data_hash = self.data_hash and not self.hash and not remote.is_url(self.path)
        metadata = self.metadata
        if self.data_hash:
            metadata = {**(metadata or {}), DATA_HASH_KEY: _UNSET_DATA_HASH}
        self._header, self.plans = build_header(self.plans, metadata)
        self._data_hash_at = self._header.index(f'"{DATA_HASH_KEY}":"{_UNSET_DATA_HASH}"'.encode()) + \
            len(DATA_HASH_KEY) + 4 if self.data_hash else -1
        self._data_hasher = data_hasher() if self.data_hash else None
        self._positions: dict[str, int] = {}
        pos = len(self._header)
        for p in self.plans:
            self._positions[p.name] = pos
            pos += p.nbytes
        self.total_bytes = pos
        if remote.is_url(self.path):
            # An object: a multipart upload, visible under the key only when completed (commit).
            if self.verify:
                raise UsageError(f"'{self.path}' cannot be read back before it is complete (an object, not a file): "
                                 "write it without the read-back check, or to a local file.")
            remote.abort_stale_uploads(self.path)
            self._out = remote.ObjectWriter(self.path)
        else:
            self._open_local()
        self._hasher = hashlib.sha256() if self.hash else None
        self._mid = len(self.plans) // 2
        self._put(memoryview(self._header))

    def _open_local(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic.remove_stale_temps(self.path)
            self._dev = atomic.reserve_space(self.path, self.total_bytes)
            self._tmp = atomic.create_temp_file(self.path)
            self._out = open_out(self._tmp, self.total_bytes, direct=self.direct)
        except OSError as e:
            self.abort()
            if isinstance(e, (OutputError, OutputExistsError)):
                raise
            raise atomic.output_error(self.path, e) from None

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if not self._done:
            self.abort()

    def position(self, name: str) -> int:
        """Byte offset in the file where tensor ``name``'s data will go."""
        return self._positions[name]

    @property
    def next_name(self) -> str | None:
        return self.plans[self._index].name if self._index < len(self.plans) else None

    def write(self, name: str, data: torch.Tensor | bytes | bytearray | memoryview) -> None:
        """Append the next tensor; ``name`` must be the next one in the plan."""
        if self._index >= len(self.plans) or self.plans[self._index].name != name:
            raise KeyMismatchError(f"writing '{name}' out of order into '{self.path}' (expected {self.next_name!r}).")
        plan = self.plans[self._index]
        if not isinstance(data, (bytes, bytearray, memoryview)):
            if dtype_name(data.dtype) != plan.dtype or tuple(data.shape) != plan.shape:
                raise ShapeMismatchError(
                    f"tensor '{name}' is {dtype_name(data.dtype)} {list(data.shape)}, the plan for '{self.path}' "
                    f"says {plan.dtype} {list(plan.shape)}."
                )
            data = tensor_to_bytes(data)
        view = memoryview(data).cast("B")
        if view.nbytes != plan.nbytes:
            raise ShapeMismatchError(f"tensor '{name}' has {view.nbytes} bytes, the plan for '{self.path}' says {plan.nbytes}.")
        self._append(view, self._index + 1)

    def write_run(self, names: Sequence[str], data: memoryview) -> None:
        """Append the next tensors at once: ``data`` holds their bytes back to back, ``names`` are the next
        ones in the plan (one write for many small tensors)."""
        end = self._index + len(names)
        if list(names) != [p.name for p in self.plans[self._index:end]]:
            raise KeyMismatchError(f"writing {list(names)[:3]}... out of order into '{self.path}' (expected {self.next_name!r}).")
        view = memoryview(data).cast("B")
        if view.nbytes != sum(p.nbytes for p in self.plans[self._index:end]):
            raise ShapeMismatchError(f"tensors {list(names)[:3]}... have {view.nbytes} bytes in all, the plan for "
                                     f"'{self.path}' says otherwise.")
        self._append(view, end)

    def _append(self, view: memoryview, end: int) -> None:
        """Write the checked bytes of the plan's tensors up to ``end`` (exclusive)."""
        if self._index <= self._mid < end:
            hooks.pause_point("mid-stream")
        if self._data_hasher is not None:
            self._data_hasher.update(view)
        self._put(view)
        self._index = end

    def _put(self, view: memoryview) -> None:
        # The sha256 of a chunk runs beside its write syscall (both release the GIL): each
        # tensor costs max(hash, write) instead of their sum. Done before returning, so the
        # caller may reuse the buffer.
        pending = None
        if self._hasher is not None:
            if view.nbytes >= _HASH_ASIDE_BYTES:
                pending = _hash_executor().submit(self._hasher.update, view)
            else:
                self._hasher.update(view)
        assert self._out is not None
        try:
            self._out.write(view)
        except OSError as e:
            raise atomic.output_error(self.path, e) from None
        finally:
            if pending is not None:
                pending.result()

    @property
    def data_xxh3_128(self) -> str | None:
        """The xxh3-128 of the tensor data recorded in the header (with ``data_hash``), once complete."""
        return self._data_hasher.hexdigest() if self._data_hasher is not None and (self._done or self._complete) else None

    @property
    def sha256(self) -> str | None:
        """sha256 of the whole file (when created with ``hash=True``), once complete."""
        return self._hasher.hexdigest() if self._hasher is not None and (self._done or self._complete) else None

    def complete(self) -> None:
        """Flush and fsync the temporary file, then read its header back and check it (and,
        with ``verify``, re-hash the data); the output name is not touched yet."""
        if self._complete:
            return
        if self._index != len(self.plans):
            raise KeyMismatchError(f"'{self.path}' is incomplete: {len(self.plans) - self._index} tensors not written (next: {self.next_name}).")
        if isinstance(self._out, remote.ObjectWriter):
            self._out.finish()  # every part uploaded; the object appears at commit
            self._complete = True
            return
        assert self._out is not None and self._tmp is not None
        patch = None
        if self._data_hasher is not None:  # the header's placeholder gets the data's hash
            digest = self._data_hasher.hexdigest().encode()
            patch = (self._data_hash_at, digest)
            at = self._data_hash_at
            self._header = self._header[:at] + digest + self._header[at + len(digest):]
        try:
            self._out.finish(patch)
            self._out.close()
            self._check_written()
        except OSError as e:
            if isinstance(e, (OutputError, OutputExistsError)):
                raise
            raise atomic.output_error(self.path, e) from None
        self._complete = True

    def _check_written(self) -> None:
        assert self._tmp is not None
        size = self._tmp.stat().st_size
        with open(self._tmp, "rb") as f:
            head = f.read(len(self._header))
            if size != self.total_bytes or head != self._header:
                raise OutputError(f"cannot write '{self.path}': the file read back is not what was written "
                                  f"({size} bytes of {self.total_bytes}, header {'intact' if head == self._header else 'differs'}).")
            read_header(self._tmp)  # the reader's own checks, on what is on disk
            if self.verify and self._hasher is not None:
                f.seek(0)
                check = hashlib.sha256()
                while chunk := f.read(16 << 20):
                    check.update(chunk)
                if check.hexdigest() != self._hasher.hexdigest():
                    raise OutputError(f"cannot write '{self.path}': its data read back differs from what was written.")

    def commit(self) -> Path:
        """Move the completed file to its name (replacing, or claiming it: see ``overwrite``)."""
        self.complete()
        if isinstance(self._out, remote.ObjectWriter):
            return self._commit_object(self._out)
        assert self._tmp is not None
        hooks.pause_point("before-rename")
        try:
            if self.overwrite:
                atomic.replace(self._tmp, self.path)
            else:
                atomic.claim(self._tmp, self.path)
        except OSError as e:
            if isinstance(e, (OutputError, OutputExistsError)):
                raise
            raise atomic.output_error(self.path, e) from None
        atomic.fsync_dir(self.path.parent)
        self._release()
        self._done = True
        return self.path

    def _commit_object(self, out: remote.ObjectWriter) -> Path:
        hooks.pause_point("before-rename")
        if not self.overwrite and remote.head(self.path) is not None:
            raise OutputExistsError(f"'{self.path}' appeared while this run was writing it (another run?): "
                                    "nothing was replaced, and this run's output was dropped.")
        out.commit()
        out.close()
        self._done = True
        return self.path

    def finalize(self) -> Path:
        """Flush, fsync, check and atomically move the finished file to its name."""
        self.complete()
        return self.commit()

    def _release(self) -> None:
        atomic.release_space(self._dev, self.total_bytes)
        self._dev = -1

    def abort(self) -> None:
        """Drop the temporary file; the output name is never touched."""
        try:
            if isinstance(self._out, remote.ObjectWriter):
                self._out.abort()
            elif self._out is not None:
                self._out.close()
        finally:
            if self._tmp is not None:
                try:
                    self._tmp.unlink()
                except FileNotFoundError:
                    pass
            self._release()
            self._done = True


_HASH_ASIDE_BYTES = 1 << 20
#: What the header holds where the data's hash goes, until the data is written.
_UNSET_DATA_HASH = "0" * 32
_HASH_EXECUTOR: ThreadPoolExecutor | None = None


def _hash_executor() -> ThreadPoolExecutor:
    global _HASH_EXECUTOR
    if _HASH_EXECUTOR is None:
        _HASH_EXECUTOR = ThreadPoolExecutor(1, thread_name_prefix="loratool-hash")
    return _HASH_EXECUTOR


def save_tensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Write a small dict of tensors atomically (for LoRAs and test fixtures)."""
    plans = [TensorPlan(k, dtype_name(v.dtype), tuple(v.shape)) for k, v in tensors.items()]
    with StreamingWriter(Path(path), plans, metadata) as w:
        for k, v in tensors.items():
            w.write(k, v)
        return w.finalize()


def load_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read every tensor of a (small) safetensors file."""
    with TensorFile(path) as f:
        return {k: f.tensor(k) for k in f.keys()}
