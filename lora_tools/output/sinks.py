"""Sinks: where streamed tensors go. A whole single file, a standalone diffusers component, a
diffusers folder, or a LoRA file, all through one atomic write (:class:`StreamingWriter`) and
one overwrite rule.

Each sink plans its file(s) before anything is computed, then takes every tensor in the same
order. Untouched tensors whose bytes are already right are copied byte for byte; everything
else is cast once to the output dtype. Finalising is two-phase so that a multi-output run is
all or nothing (:func:`finalize_all`): every sink :meth:`complete` s (fsync, header re-read),
then every sink :meth:`commit` s (rename); on any failure the renamed ones are rolled back.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lora_tools.errors import OutputError, OutputExistsError
from lora_tools.io import atomic, hashing, remote
from lora_tools.io.diffusers_folder import write_pipeline_configs
from lora_tools.io.model import ModelSource, TensorRef
from lora_tools.io.safetensors import StreamingWriter, TensorInfo, TensorPlan, bytes_to_tensor, dtype_name, torch_dtype
from lora_tools.layouts.sdxl import to_diffusers
from lora_tools.layouts.table import DIFFUSERS_FOLDERS, Component, KeyMap
from lora_tools.output.plan import WrittenFile, check_output, refuse_input_as_output
from lora_tools.testing import hooks

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


class Finalisable(Protocol):
    """An output that is finalised all or nothing with the others of its run (:func:`finalize_all`)."""

    kind: str

    def complete(self) -> None: ...
    def commit(self) -> list[WrittenFile]: ...
    def rollback(self) -> None: ...
    def cleanup(self) -> None: ...
    def abort(self) -> None: ...


class Sink(Finalisable, Protocol):
    """What the streaming engine writes into (every output kind implements it).

    A sink may also have ``prepare(ref, payload) -> None``: the engine calls it on the compute
    threads, before :meth:`add` (on the one writer thread), to encode the tensor there (fp8); and
    ``patch_dtype(ref) -> str | None``: the dtype it needs a patched tensor computed into, where that
    is not the run's output dtype (fp8: fp32 for the tensors it rounds, ``None`` for the others); and
    ``block_encoding(ref) -> encoding | None``: an encoding the engine may apply to each row block of a
    patched tensor while it computes it, when every sink that wants the tensor asks for the same one
    (fp8: :class:`lora_tools.io.fp8.Fp8Encoding`; the result arrives as ``Payload.encoded``); and
    ``writes_raw(ref) -> bool`` with ``add_run(refs, data)``: untouched tensors it writes as read, which a
    run's only sink takes several at a time when they are adjacent in the model and in its file.
    """

    def wants(self, ref: TensorRef) -> bool: ...
    def position(self, ref: TensorRef) -> int | None: ...
    def add(self, ref: TensorRef, payload: Payload) -> None: ...


@dataclass
class Payload:
    """One base tensor on its way out: its original bytes, or a (patched) tensor."""

    raw: memoryview | bytearray | None
    tensor: torch.Tensor | None
    patched: bool
    ops: list | None = None  # row-block patch operations, prepared by the reader
    amax: float | None = None  # the patched tensor's largest magnitude, where the engine measured it
    encoded: Any = None  # what a sink's ``prepare`` made of it (the fp8 sinks: the rounded tensor)
    spare: memoryview | bytearray | None = None  # the read buffer of a tensor patched elsewhere: room for ``encoded``

    def as_tensor(self, ref: TensorRef) -> torch.Tensor:
        if self.tensor is not None:
            return self.tensor
        assert self.raw is not None and not self.patched, f"'{ref.key}': its patched value was dropped"
        return bytes_to_tensor(self.raw, TensorInfo(ref.key, ref.dtype, ref.shape, 0, ref.nbytes))


DtypeFor = Callable[[str], str]


def _emit(writer: StreamingWriter, name: str, ref: TensorRef, payload: Payload, out_dtype: str,
          row: KeyMap | None) -> None:
    """Write one tensor: raw bytes when nothing changes, else one cast of the (converted) tensor."""
    same_bytes = payload.raw is not None and out_dtype == ref.dtype and (row is None or row.keeps_values)
    if same_bytes:
        writer.write(name, payload.raw)  # type: ignore[arg-type]
        return
    t = payload.as_tensor(ref)
    if row is not None:
        t = to_diffusers(row, t)
    if t.is_floating_point():
        t = t.to(torch_dtype(out_dtype))
    writer.write(name, t.contiguous())


#: Outputs up to this size are sha256-hashed while written by default (the summary's sha256 and
#: AutoV2). Above it the hash is left to whoever asks (the same rule as the records' input pins,
#: :func:`lora_tools.io.hashing.file_pin`).
FULL_HASH_MAX_BYTES = hashing.FULL_HASH_MAX_BYTES


def wants_hash(plans: Sequence[TensorPlan], hash: bool | None, verify: bool) -> bool:
    """Whether an output of ``plans`` is sha256-hashed while written: as asked, else when it is small
    (or verified: the check compares against that hash). A local file that is not records the
    xxh3-128 of its data in its header instead, unless ``hash`` is ``False`` (no hash at all)."""
    if verify:
        return True
    if hash is not None:
        return hash
    return sum(p.nbytes for p in plans) <= FULL_HASH_MAX_BYTES


class _FileSink:
    """One safetensors output file, hashed while written (see :func:`wants_hash`), finalised in two phases."""

    kind: str

    def __init__(self, path: Path, plans: list[TensorPlan], dtype_for: DtypeFor, metadata: Mapping[str, str],
                 *, overwrite: bool = True, verify: bool = False, hash: bool | None = True):
        self.writer = StreamingWriter(path, plans, dict(metadata), hash=wants_hash(plans, hash, verify),
                                      data_hash=hash is not False, overwrite=overwrite, verify=verify)
        self.dtype_for = dtype_for
        self._old: Path | None = None
        self._committed = False
        self._existed = path.exists()

    def complete(self) -> None:
        self.writer.complete()

    def commit(self) -> list[WrittenFile]:
        path = self.writer.path
        if remote.is_url(path):
            p = self.writer.commit()
            self._committed = True
            return [self.written(p, self.writer.total_bytes)]
        hooks.pause_point("before-rename")
        if self.writer.overwrite and path.is_file() and not path.is_symlink():
            old = atomic.temp_path(path, old=True)  # kept until every output of the run is in place
            try:
                os.link(path, old)
                self._old = old
            except OSError:
                self._old = None
        appeared = not self._existed and self.writer.overwrite and path.exists()
        p = self.writer.commit()
        self._committed = True
        if appeared:
            _say_replaced(path)
        return [self.written(p, p.stat().st_size)]

    def written(self, path: Path, nbytes: int, *, kind: str | None = None) -> WrittenFile:
        """What this sink wrote (as part of ``kind``: a folder's), with the hash taken while writing."""
        return WrittenFile(kind or self.kind, path, nbytes, self.writer.sha256, self.writer.data_xxh3_128)

    def rollback(self) -> None:
        """Undo :meth:`commit`: the earlier file comes back, or the name is free again."""
        if not self._committed:
            return
        if remote.is_url(self.writer.path):
            # An object has no rename to undo: a new one is deleted; a replaced one cannot come back.
            if not self._existed:
                remote.delete(self.writer.path)
            else:
                logger.warning("'%s' was replaced before another output of this run failed: it cannot be restored",
                               self.writer.path)
            self._committed = False
            return
        if self._old is not None:
            os.replace(self._old, self.writer.path)
            self._old = None
        else:
            atomic.remove(self.writer.path)
        self._committed = False

    def cleanup(self) -> None:
        if self._old is not None:
            atomic.remove(self._old)
            self._old = None

    def abort(self) -> None:
        self.writer.abort()


def _say_replaced(path: Path) -> None:
    logger.warning("'%s' appeared while this run was writing it (another run?): replaced it with this run's output",
                   path)


class LoraFileSink(_FileSink):
    """A LoRA (or any small tensor dict) file: the same atomic write and overwrite rule."""

    kind = "lora"

    def __init__(self, path: Path, plans: list[TensorPlan], metadata: Mapping[str, str], *,
                 overwrite: bool = False, verify: bool = False):
        super().__init__(path, plans, lambda d: d, metadata, overwrite=overwrite, verify=verify)

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        self.writer.write(name, tensor.contiguous())


def write_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                      metadata: Mapping[str, str] | None = None, *, overwrite: bool = False, verify: bool = False,
                      inputs: Sequence[Path] = (), kind: str = "lora") -> WrittenFile:
    """Write tensors to one safetensors file through the one output path.

    Args:
        path: the output file.
        tensors: name -> tensor (or ``(name, tensor)`` pairs), in file order.
        metadata: the header's ``__metadata__`` (see :func:`lora_tools.output.metadata.output_metadata`).
        overwrite: replace an existing file; without it an existing file is refused at once,
            and a file that appears while writing (another run) makes this one fail.
        verify: re-read the written data and check its sha256 before the rename.
        inputs: files this operation reads (none may be the output).
        kind: the :attr:`WrittenFile.kind` to report.

    Returns:
        The file written, with its sha256 (and :attr:`WrittenFile.autov2`).

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is not set.
        OutputError: the path cannot be written (its kind, permissions, space, disk full).
    """
    out = Path(path)
    refuse_input_as_output(out, inputs)
    check_output(out, "file", overwrite=overwrite)
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    plans = [TensorPlan(k, dtype_name(v.dtype), tuple(v.shape)) for k, v in items]
    sink = LoraFileSink(out, plans, dict(metadata or {"format": "pt"}), overwrite=overwrite, verify=verify)
    sink.kind = kind
    try:
        for k, v in items:
            sink.add_tensor(k, v)
        return finalize_all([sink])[0]  # the one finalising path (complete, commit, clean up)
    except BaseException:
        sink.abort()
        raise


def finalize_all(sinks: Sequence[Finalisable]) -> list[WrittenFile]:
    """Finalise every output of one run, or none: complete all (fsync, checks), then rename
    all; if any step fails, the outputs renamed so far are rolled back and every temp removed."""
    committed: list[Finalisable] = []
    try:
        for s in sinks:
            s.complete()
        files: list[WrittenFile] = []
        for s in sinks:
            files += s.commit()
            committed.append(s)
    except BaseException:
        for s in reversed(committed):
            try:
                s.rollback()
            except OSError as e:
                logger.warning("could not roll back '%s': %s", getattr(s, "path", s), atomic.reason(e))
        for s in sinks:
            s.abort()
        raise
    for s in sinks:
        s.cleanup()
    return files


class CheckpointSink(_FileSink):
    """The whole single file in SGM layout: the base's keys, in processing order."""

    kind = "checkpoint"

    def __init__(self, path: Path, refs: Sequence[TensorRef], dtype_for: DtypeFor, metadata: Mapping[str, str],
                 *, overwrite: bool = True, verify: bool = False, hash: bool | None = None):
        super().__init__(path, [TensorPlan(r.key, dtype_for(r.dtype), r.shape) for r in refs], dtype_for, metadata,
                         overwrite=overwrite, verify=verify, hash=hash)

    def wants(self, ref: TensorRef) -> bool:
        return True

    def position(self, ref: TensorRef) -> int | None:
        """Where ``ref``'s bytes go in the file (``None`` when they are not written as read)."""
        return self.writer.position(ref.key)

    def add(self, ref: TensorRef, payload: Payload) -> None:
        _emit(self.writer, ref.key, ref, payload, self.dtype_for(ref.dtype), None)

    def writes_raw(self, ref: TensorRef) -> bool:
        """Whether an untouched ``ref`` is written as its bytes were read (then :meth:`add_run` may take it)."""
        return self.dtype_for(ref.dtype) == ref.dtype

    def add_run(self, refs: Sequence[TensorRef], data: memoryview) -> None:
        """Untouched tensors that :meth:`writes_raw`, adjacent in this file, their bytes back to back."""
        self.writer.write_run([r.key for r in refs], data)


class ComponentSink(_FileSink):
    """One component in diffusers layout (a standalone UNet file, or one file of a folder)."""

    def __init__(self, path: Path, refs: Sequence[TensorRef], component: Component, dtype_for: DtypeFor,
                 metadata: Mapping[str, str], kind: str = "unet", *, overwrite: bool = True, verify: bool = False,
                 hash: bool | None = None):
        self.component = component
        self.kind = kind
        plans = [TensorPlan(row.diffusers, dtype_for(r.dtype), row.diffusers_shape)  # type: ignore[arg-type]
                 for r in refs if self.wants(r) for row in r.rows]
        super().__init__(path, plans, dtype_for, metadata, overwrite=overwrite, verify=verify, hash=hash)

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
    """A ``StableDiffusionXLPipeline`` folder, written in a temporary folder and renamed at the end.

    With ``overwrite``, an existing folder is replaced only when it is recognisably an earlier
    output of ours (checked at plan time by :func:`~lora_tools.output.plan.check_output`, and
    again here); the replaced folder is kept until every output of the run is in place.
    """

    kind = "diffusers"

    def __init__(self, path: Path, model: ModelSource, refs: Sequence[TensorRef], dtype_for: DtypeFor,
                 metadata: Mapping[str, str], scheduler_config: Mapping[str, object], tokenizers: Callable[[Path], None],
                 *, overwrite: bool = True, verify: bool = False, hash: bool | None = None):
        self.path = path
        self.overwrite = overwrite
        self.model = model
        self.sinks: list[ComponentSink] = []
        self.tmp: Path | None = None
        self._old: Path | None = None
        self._committed = False
        self._existed = path.exists()
        try:
            check_output(path, "folder", overwrite=True)  # its kind, and whether it is ours to replace
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic.remove_stale_temps(path)
            self.tmp = atomic.create_temp_dir(path)
            for comp in ("unet", "vae", "te1", "te2"):
                folder = self.tmp / DIFFUSERS_FOLDERS[comp]
                folder.mkdir()
                fname = "diffusion_pytorch_model.safetensors" if comp in ("unet", "vae") else "model.safetensors"
                self.sinks.append(ComponentSink(folder / fname, refs, comp, dtype_for,
                                                metadata if comp == "unet" else {"format": "pt"}, kind="diffusers",
                                                verify=verify, hash=hash))
            write_pipeline_configs(self.tmp, model.cfg, scheduler_config)
            tokenizers(self.tmp)
        except OSError as e:
            self.abort()
            if isinstance(e, (OutputError, OutputExistsError)):
                raise
            raise atomic.output_error(path, e) from None
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

    def complete(self) -> None:
        for s in self.sinks:
            s.complete()
            s.commit()  # inside the temporary folder
        atomic.fsync_dir(self.tmp)  # type: ignore[arg-type]

    def commit(self) -> list[WrittenFile]:
        assert self.tmp is not None
        hooks.pause_point("before-rename")
        try:
            if self.path.exists() or self.path.is_symlink():
                if not self.overwrite:
                    raise OutputExistsError(f"'{self.path}' appeared while this run was writing it (another run?): "
                                            "nothing was replaced, and this run's output was dropped.")
                check_output(self.path, "folder", overwrite=True)  # still ours, right before replacing it
                self._old = atomic.replace(self.tmp, self.path)
                if not self._existed:
                    _say_replaced(self.path)
            else:
                atomic.claim(self.tmp, self.path)
        except OSError as e:
            if isinstance(e, (OutputError, OutputExistsError)):
                raise
            raise atomic.output_error(self.path, e) from None
        atomic.fsync_dir(self.path.parent)
        self._committed = True
        files = []
        for s in self.sinks:
            p = self.path / s.writer.path.relative_to(self.tmp)
            files.append(s.written(p, p.stat().st_size, kind=self.kind))
        return files

    def rollback(self) -> None:
        if not self._committed:
            return
        if self._old is not None:
            ours = atomic.replace(self._old, self.path)  # the earlier folder back, ours under a temp name
            if ours is not None:
                atomic.remove(ours)
            self._old = None
        else:
            atomic.remove(self.path)
        self._committed = False

    def cleanup(self) -> None:
        if self._old is not None:
            atomic.remove(self._old)
            self._old = None

    def abort(self) -> None:
        for s in self.sinks:
            s.abort()
        if self.tmp is not None and not self._committed:
            atomic.remove(self.tmp)


def tokenizer_provider(model: ModelSource, download: Callable[[], Mapping[str, Path]]) -> Callable[[Path], None]:
    """Where the diffusers folder's tokenizers come from: the base folder, the byte tokenizer
    for synthetic small-vocabulary models, or else the files ``download()`` gives (the SDXL base
    repo's, through :func:`lora_tools.hub.tokenizer_files`), fetched now, before anything is written."""
    from lora_tools.io.diffusers_folder import write_byte_tokenizer

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
    files = download()

    def hub(root: Path) -> None:
        for rel, src in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, root / rel)
    return hub
