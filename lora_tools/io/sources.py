"""Open a tensor file of any container we read, lazily, without executing code.

``.safetensors`` files are read header-first (no torch import until a tensor is needed).
Legacy ``.ckpt``/``.pt``/``.bin`` files are read only with ``torch.load(weights_only=True)``;
a pickle that needs code execution is refused, never run.
"""

from __future__ import annotations

import os
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from lora_tools.errors import InvalidFileError, UnsafeFileError
from lora_tools.io.remote import as_path, is_url
from lora_tools.io.safetensors import SafetensorsHeader, TensorFile, dtype_name, read_header
from lora_tools.special_files import refuse_special

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True, slots=True)
class TensorMeta:
    dtype: str
    shape: tuple[int, ...]


class TensorSource(Protocol):
    """What every reader offers: names, dtypes and shapes first; tensors on demand."""

    path: Path
    metadata: dict[str, str]

    def keys(self) -> list[str]: ...
    def meta(self, key: str) -> TensorMeta: ...
    def tensor(self, key: str) -> torch.Tensor: ...
    def scalar(self, key: str) -> float: ...
    def close(self) -> None: ...


class SafetensorsSource:
    """A safetensors file; tensors read one at a time with plain file I/O."""

    def __init__(self, path: Path, header: SafetensorsHeader | None = None):
        self.header = header or read_header(path)
        self.path = as_path(path)
        self.metadata = self.header.metadata
        self._file: TensorFile | None = None

    def keys(self) -> list[str]:
        return self.header.keys()

    def meta(self, key: str) -> TensorMeta:
        info = self.header.tensors[key]
        return TensorMeta(info.dtype, info.shape)

    def _open(self) -> TensorFile:
        if self._file is None:
            self._file = TensorFile(self.path, self.header)
        return self._file

    def tensor(self, key: str) -> torch.Tensor:
        return self._open().tensor(key)

    def raw(self, key: str) -> bytearray:
        return self._open().read_bytes(key)

    def scalar(self, key: str) -> float:
        """Read a one-element float tensor without importing torch."""
        info = self.header.tensors[key]
        if info.numel != 1:
            raise InvalidFileError(f"'{self.path}': '{key}' should hold one number, it has shape {list(info.shape)}.")
        data = bytes(self._open().read_bytes(key))
        if info.dtype == "F32":
            return struct.unpack("<f", data)[0]
        if info.dtype == "F16":
            return struct.unpack("<e", data)[0]
        if info.dtype == "BF16":
            return struct.unpack("<f", b"\x00\x00" + data)[0]
        if info.dtype == "F64":
            return struct.unpack("<d", data)[0]
        if info.dtype in ("I64", "I32", "I16", "I8", "U8"):
            return float(int.from_bytes(data, "little", signed=info.dtype.startswith("I")))
        raise InvalidFileError(f"'{self.path}': '{key}' has dtype {info.dtype}, expected a float.")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class StateDictSource:
    """Tensors already in memory (legacy pickle files loaded with ``weights_only=True``)."""

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
        self.path = path
        self.tensors = tensors
        self.metadata = metadata or {}

    def keys(self) -> list[str]:
        return list(self.tensors)

    def meta(self, key: str) -> TensorMeta:
        t = self.tensors[key]
        return TensorMeta(dtype_name(t.dtype), tuple(t.shape))

    def tensor(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def scalar(self, key: str) -> float:
        return float(self.tensors[key].item())

    def close(self) -> None:
        pass


def open_source(path: str | os.PathLike[str]) -> SafetensorsSource | StateDictSource:
    """Open a LoRA or checkpoint file by content (safetensors) or suffix (legacy pickle)."""
    path = as_path(path)
    if is_url(path) and path.suffix.lower() in PICKLE_SUFFIXES:
        raise InvalidFileError(f"'{path}' is a {path.suffix} object: objects are read as safetensors only.")
    if is_url(path):
        return SafetensorsSource(path)  # its header read says when there is no such object
    if path.is_dir():
        raise InvalidFileError(f"'{path}' is a directory: pass a .safetensors file (or a diffusers folder where a model is expected).")
    if not path.exists():
        raise InvalidFileError(f"'{path}' does not exist.")
    refuse_special(path)
    suffix = path.suffix.lower()
    # A pickle under a .safetensors name is refused by read_header (UnsafeFileError), never loaded.
    if suffix in PICKLE_SUFFIXES or (suffix != ".safetensors" and _is_zip(path)):
        return StateDictSource(path, load_pickle_weights(path))
    return SafetensorsSource(path)


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def _unpickler_reason(text: str) -> str:
    """What torch's weights-only unpickler refused, from its long message (``it calls builtins.exec``)."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return f"it calls {found.group(1)}"
    found = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return (found.group(1).strip() if found else lines[0] if lines else "unsupported pickle")[:160]


def load_pickle_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load a legacy PyTorch file with ``weights_only=True``; refuse anything needing code."""
    import pickle

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        raise UnsafeFileError(
            f"'{path}' is a pickle that needs code execution to load ({_unpickler_reason(str(e))}); lora_tools "
            f"never runs untrusted pickles. Convert it to .safetensors with a tool you trust."
        ) from None
    except PermissionError as e:
        raise InvalidFileError(f"'{path}' cannot be read: {e.strerror}.") from None
    except Exception as e:  # noqa: BLE001 - any failure to parse an untrusted file is a bad input
        text = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise InvalidFileError(f"'{path}' is not a readable PyTorch file ({text}).") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise InvalidFileError(f"'{path}' holds a {type(obj).__name__}, not a dict of tensors.")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise InvalidFileError(f"'{path}' holds no tensors.")
    return tensors
