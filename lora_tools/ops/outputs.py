"""Output writers of a fuse: whole single file, standalone diffusers UNet, diffusers folder.

Each sink plans its file(s) from the base's tensor list before anything is computed, then takes
every tensor in the same order. Untouched tensors whose bytes are already right are copied
byte for byte; everything else is cast once to the output dtype.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from lora_tools.layouts.sdxl import to_diffusers
from lora_tools.layouts.table import DIFFUSERS_FOLDERS, Component, KeyMap
from lora_tools.models import ModelSource, TensorRef
from lora_tools.safetensors_io import StreamingWriter, TensorInfo, TensorPlan, bytes_to_tensor, torch_dtype
from lora_tools.diffusers_folder import write_pipeline_configs

if TYPE_CHECKING:
    import torch


@dataclass
class Payload:
    """One base tensor on its way out: its original bytes, or a (patched) tensor."""

    raw: memoryview | bytearray | None
    tensor: "torch.Tensor | None"
    patched: bool
    ops: list | None = None  # type: ignore[type-arg]  # row-block patch operations, prepared by the reader

    def as_tensor(self, ref: TensorRef) -> "torch.Tensor":
        if self.tensor is not None:
            return self.tensor
        assert self.raw is not None
        return bytes_to_tensor(self.raw, TensorInfo(ref.key, ref.dtype, ref.shape, 0, ref.nbytes))


@dataclass(frozen=True)
class WrittenFile:
    kind: str
    path: Path
    nbytes: int
    sha256: str | None


DtypeFor = Callable[[str], str]


def _emit(writer: StreamingWriter, name: str, ref: TensorRef, payload: Payload, out_dtype: str,
          row: KeyMap | None) -> None:
    """Write one tensor: raw bytes when nothing changes, else one cast of the (converted) tensor."""
    same_bytes = payload.raw is not None and out_dtype == ref.dtype and (row is None or row.transform in ("rename", "conv1x1_to_linear"))
    if same_bytes:
        writer.write(name, payload.raw)  # type: ignore[arg-type]
        return
    t = payload.as_tensor(ref)
    if row is not None:
        t = to_diffusers(row, t)
    if t.is_floating_point():
        t = t.to(torch_dtype(out_dtype))
    writer.write(name, t.contiguous())


class _FileSink:
    """One safetensors output file, hashed while written."""

    kind: str

    def __init__(self, path: Path, plans: list[TensorPlan], dtype_for: DtypeFor, metadata: Mapping[str, str]):
        self.writer = StreamingWriter(path, plans, dict(metadata), hash=True)
        self.dtype_for = dtype_for

    def finalize(self) -> list[WrittenFile]:
        p = self.writer.finalize()
        return [WrittenFile(self.kind, p, p.stat().st_size, self.writer.sha256)]

    def abort(self) -> None:
        self.writer.abort()


class CheckpointSink(_FileSink):
    """The whole single file in SGM layout: the base's keys, in processing order."""

    kind = "checkpoint"

    def __init__(self, path: Path, refs: Sequence[TensorRef], dtype_for: DtypeFor, metadata: Mapping[str, str]):
        super().__init__(path, [TensorPlan(r.key, dtype_for(r.dtype), r.shape) for r in refs], dtype_for, metadata)

    def wants(self, ref: TensorRef) -> bool:
        return True

    def position(self, ref: TensorRef) -> int | None:
        """Where ``ref``'s bytes go in the file (``None`` when they are not written as read)."""
        return self.writer.position(ref.key)

    def add(self, ref: TensorRef, payload: Payload) -> None:
        _emit(self.writer, ref.key, ref, payload, self.dtype_for(ref.dtype), None)


class ComponentSink(_FileSink):
    """One component in diffusers layout (a standalone UNet file, or one file of a folder)."""

    def __init__(self, path: Path, refs: Sequence[TensorRef], component: Component, dtype_for: DtypeFor,
                 metadata: Mapping[str, str], kind: str = "unet"):
        self.component = component
        self.kind = kind
        plans = [TensorPlan(row.diffusers, dtype_for(r.dtype), row.diffusers_shape)  # type: ignore[arg-type]
                 for r in refs if self.wants(r) for row in r.rows]
        super().__init__(path, plans, dtype_for, metadata)

    def wants(self, ref: TensorRef) -> bool:
        return bool(ref.rows) and ref.rows[0].component == self.component and ref.rows[0].diffusers is not None

    def position(self, ref: TensorRef) -> int | None:
        if not self.wants(ref) or len(ref.rows) != 1:
            return None
        return self.writer.position(ref.rows[0].diffusers)  # type: ignore[arg-type]

    def add(self, ref: TensorRef, payload: Payload) -> None:
        if not self.wants(ref):
            return
        for row in ref.rows:
            _emit(self.writer, row.diffusers, ref, payload, self.dtype_for(ref.dtype), row)  # type: ignore[arg-type]


class DiffusersFolderSink:
    """A ``StableDiffusionXLPipeline`` folder, written in a temporary folder and renamed at the end."""

    kind = "diffusers"

    def __init__(self, path: Path, model: ModelSource, refs: Sequence[TensorRef], dtype_for: DtypeFor,
                 metadata: Mapping[str, str], scheduler_config: Mapping[str, object], tokenizers: Callable[[Path], None]):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
        self.model = model
        self.sinks: list[ComponentSink] = []
        try:
            for comp in ("unet", "vae", "te1", "te2"):
                folder = self.tmp / DIFFUSERS_FOLDERS[comp]  # type: ignore[index]
                folder.mkdir()
                fname = "diffusion_pytorch_model.safetensors" if comp in ("unet", "vae") else "model.safetensors"
                self.sinks.append(ComponentSink(folder / fname, refs, comp, dtype_for,  # type: ignore[arg-type]
                                                metadata if comp == "unet" else {"format": "pt"}, kind="diffusers"))
            write_pipeline_configs(self.tmp, model.cfg, scheduler_config)
            tokenizers(self.tmp)
        except BaseException:
            self.abort()
            raise

    def wants(self, ref: TensorRef) -> bool:
        return any(s.wants(ref) for s in self.sinks)

    def position(self, ref: TensorRef) -> int | None:
        return next((s.position(ref) for s in self.sinks if s.wants(ref)), None)

    def add(self, ref: TensorRef, payload: Payload) -> None:
        for s in self.sinks:
            s.add(ref, payload)

    def finalize(self) -> list[WrittenFile]:
        files = [f for s in self.sinks for f in s.finalize()]
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)
        return [WrittenFile(self.kind, self.path / f.path.relative_to(self.tmp), f.nbytes, f.sha256) for f in files]

    def abort(self) -> None:
        for s in self.sinks:
            s.abort()
        shutil.rmtree(self.tmp, ignore_errors=True)


def tokenizer_provider(model: ModelSource, revision: str | None) -> Callable[[Path], None]:
    """Where the diffusers folder's tokenizers come from: the base folder, the byte tokenizer
    for synthetic small-vocabulary models, or the SDXL base repo through the hub."""
    from lora_tools.diffusers_folder import write_byte_tokenizer

    base = model.path
    if model.layout == "diffusers-folder" and (base / "tokenizer").is_dir() and (base / "tokenizer_2").is_dir():
        def copy(root: Path) -> None:
            for name in ("tokenizer", "tokenizer_2"):
                shutil.copytree(base / name, root / name)
        return copy
    if model.cfg.te1.vocab < 49408 and model.cfg.te2.vocab < 49408:
        def byte(root: Path) -> None:
            write_byte_tokenizer(root / "tokenizer", model.cfg.te1.vocab, model.cfg.te1.positions)
            write_byte_tokenizer(root / "tokenizer_2", model.cfg.te2.vocab, model.cfg.te2.positions)
        return byte
    from lora_tools.hub import resolve_file
    from lora_tools.presets import SDXL_BASE_REPO

    files = {}
    for name in ("tokenizer", "tokenizer_2"):
        for f in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
            files[f"{name}/{f}"] = resolve_file(SDXL_BASE_REPO, f"{name}/{f}", revision=None,
                                                instead="--save checkpoint and --save unet need no tokenizer.")

    def hub(root: Path) -> None:
        for rel, src in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, root / rel)
    return hub
