"""Planning outputs before anything is written: default names, inputs never outputs, the
overwrite rule, the kind of every output path, free space, and the list of written files.

Every command that writes model or LoRA files calls :func:`check_output` for each output at
plan time; the writers (:mod:`lora_tools.output.sinks`) then reserve the exact byte counts with
:func:`lora_tools.io.atomic.reserve_space` before computing anything.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lora_tools.errors import Hint, OutputError, OutputExistsError, UsageError
from lora_tools.io import remote
from lora_tools.io.atomic import TEMP_SUFFIX, existing_ancestor
from lora_tools.provenance import LORATOOL_METADATA_KEY
from lora_tools.testing.hooks import pause_point

OutputKind = Literal["file", "folder"]


@dataclass(frozen=True)
class WrittenFile:
    """One file a command wrote.

    Attributes:
        kind: what it is (``checkpoint``, ``unet``, ``diffusers``, ``lora``).
        path: where it is, under its final name.
        nbytes: its size.
        sha256: the sha256 of the whole file (hex), hashed while it was written.
        data_xxh3_128: the xxh3-128 of its tensor data recorded in its header (hex), where no sha256 was taken.
    """

    kind: str
    path: Path
    nbytes: int
    sha256: str | None
    data_xxh3_128: str | None = None

    @property
    def autov2(self) -> str | None:
        """The AutoV2 hash model sites show (the sha256's first 10 hex digits)."""
        return self.sha256[:10] if self.sha256 else None


def default_stem(base: Path, preset: object | None, labels: Sequence[str], method: str = "lora") -> str:
    """The output name (without suffix) of a fuse of ``base``.

    Args:
        base: the base file or folder.
        preset: the acceleration preset baked in (anything with ``name`` and ``lora_file``).
        labels: the labels of the extra LoRAs (the preset's own LoRA excluded).
        method: ``lora`` or ``unet``.
    """
    stem = base.name if base.is_dir() else base.stem
    if preset is not None:
        stem += f"-{preset.name}"  # type: ignore[attr-defined]  # Lightning: -lightning-4step
        if method == "unet" and getattr(preset, "lora_file", None) is not None:
            stem += "-unetdiff"
    if labels:
        stem += "-" + "-".join(Path(lab).stem.replace(" ", "_") for lab in labels[:2])
        if len(labels) > 2:
            stem += f"-and{len(labels) - 2}more"
    return stem


def inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` (resolved) lies inside ``folder``."""
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def refuse_input_as_output(output: Path, inputs: Iterable[Path]) -> None:
    """Raise :class:`UsageError` when ``output`` is one of ``inputs`` or holds one of them."""
    if remote.is_url(output):
        if any(remote.is_url(p) and remote.url_of(p) == remote.url_of(output) for p in inputs):
            raise UsageError(f"Refusing to write '{remote.url_of(output)}': it is one of the inputs.")
        return
    for p in inputs:
        if remote.is_url(p):
            continue
        if output.resolve() == Path(p).resolve() or inside(Path(p), output):
            raise UsageError(f"Refusing to write '{output}': it is one of the inputs.")


#: Every file a diffusers SDXL folder of ours holds (relative paths).
_FOLDER_FILES = frozenset(
    ["model_index.json", "scheduler/scheduler_config.json"]
    + [f"{c}/{f}" for c in ("unet", "vae") for f in ("config.json", "diffusion_pytorch_model.safetensors")]
    + [f"{c}/{f}" for c in ("text_encoder", "text_encoder_2") for f in ("config.json", "model.safetensors")]
    + [f"{t}/{f}" for t in ("tokenizer", "tokenizer_2")
       for f in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "tokenizer.json")]
)


def earlier_output_of_ours(folder: Path) -> str | None:
    """Why ``folder`` may be replaced: ``None`` when it is recognisably an earlier output of
    ours (our record in its UNet's metadata, or only files we would write), else the reason
    it may not."""
    if folder.is_symlink():
        return "it is a symbolic link"
    files: list[str] = []
    for root, dirs, names in os.walk(folder):
        for d in dirs:
            if (Path(root) / d).is_symlink():
                return f"it holds a symbolic link '{Path(root, d).relative_to(folder)}'"
        files += [str(Path(root, n).relative_to(folder)) for n in names]
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    if unet.is_file():
        from lora_tools.io.safetensors import read_header

        try:
            if LORATOOL_METADATA_KEY in read_header(unet).metadata:
                return None
        except Exception:  # noqa: BLE001 - any unreadable header just means "not recognisably ours"
            pass
    foreign = sorted(f for f in files if f not in _FOLDER_FILES)
    if not files:
        return None
    if foreign:
        return f"it holds files loratool does not write (such as '{foreign[0]}')"
    return None


class ExistsError(OutputExistsError):
    """An output exists: ``'X' already exists: pass overwrite=True to replace it, or output=PATH
    to choose another name`` (the CLI spells both parameters as its flags)."""

    def render(self, spell_param: object | None = None) -> str:
        if self.hint is None:
            return self.message
        flag = spell_param if callable(spell_param) else None
        other = Hint("output", "to choose another name", "PATH" if flag is None else None)
        return (f"{self.message}: {self.hint.render(flag(self.hint.param) if flag else None)}, "
                f"or {other.render(flag('output') if flag else None)[5:]}.")


#: Room a temp name takes beyond its output's name (``.NAME.<pid>-<n>.loratool.partial``, ``-old`` included).
_TEMP_EXTRA = len(".." + "4294967295-999999-old" + TEMP_SUFFIX)


def check_name_length(path: Path, folder: Path) -> None:
    """Refuse a name that, with the room its temp name takes, is longer than ``folder``'s file system allows."""
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    if len(os.fsencode(path.name)) + _TEMP_EXTRA > name_max:
        raise OutputError(f"cannot write '{path}': file name too long (at most {name_max - _TEMP_EXTRA} bytes here, "
                          "room is kept for the temporary name); choose a shorter name.")


def check_place(path: Path) -> None:
    """Check, at plan time, that an output can be made at ``path`` whatever its kind: its name and its
    temp name fit the file system, no file stands where a folder of its path goes, and the nearest
    existing folder may be written (the kind and overwrite rules are the caller's).

    Raises:
        OutputError: the name is too long, a file is in the way, or the folder is read-only or not writable.
    """
    remote.refuse_folder(path)
    anc = existing_ancestor(path)
    if not anc.is_dir():
        raise OutputError(f"cannot write '{path}': '{anc}' is a file, not a folder.")
    check_name_length(path, anc)
    if not os.access(anc, os.W_OK | os.X_OK):
        why = "read-only file system" if _read_only(anc) else "permission denied"
        raise OutputError(f"cannot write in '{anc}': {why}.")


#: File names that promise a pickle (torch.save) checkpoint: never given to the safetensors we write.
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})


def check_output(path: Path, kind: OutputKind, *, overwrite: bool) -> None:
    """Check, at plan time, that ``path`` can become an output of ``kind``.

    Raises:
        OutputExistsError: it exists and ``overwrite`` is not set.
        OutputError: its kind is wrong (a folder where a file goes, a file in the way of a
            folder), its folder cannot be written, or it is a folder that is not ours to replace.
    """
    pause_point("planning")
    if remote.is_url(path):
        return check_object_output(remote.as_path(path), kind, overwrite=overwrite)
    anc = existing_ancestor(path)
    if not anc.is_dir():
        raise OutputError(f"cannot write '{path}': '{anc}' is a file, not a folder.")
    check_name_length(path, anc)
    if path.name.endswith(TEMP_SUFFIX):
        raise UsageError(f"Refusing to write '{path}': that name is how loratool marks its temporary files.")
    if kind == "file" and path.suffix.lower() in PICKLE_SUFFIXES:
        raise UsageError(f"Refusing to write '{path}': loratool writes safetensors, and a {path.suffix} name says "
                         "pickle to the tools that load it", hint=Hint("output", "ending in .safetensors", "PATH"))
    if path.exists() or path.is_symlink():
        if kind == "file" and path.is_dir():
            raise OutputError(f"cannot write '{path}': it is a directory (the output is a file).")
        if kind == "folder" and not path.is_dir():
            raise OutputError(f"cannot write '{path}': it is a file (the output is a folder).")
        if kind == "folder":
            why = earlier_output_of_ours(path)
            if why is not None:
                raise OutputError(f"'{path}' already exists and is not an earlier loratool output ({why}): "
                                  "it will not be replaced; choose another output name.")
        if not overwrite:
            raise ExistsError(f"'{path}' already exists", hint=Hint("overwrite", "to replace it"))
    if not os.access(anc, os.W_OK | os.X_OK):
        why = "read-only file system" if _read_only(anc) else "permission denied"
        raise OutputError(f"cannot write in '{anc}': {why}.")


def check_object_output(path: Path, kind: OutputKind, *, overwrite: bool) -> None:
    """The output rules for an object (``s3://bucket/key``): a file, never a folder; its name not a pickle's;
    an existing object replaced only with ``overwrite`` and only when its header carries our record (read
    with a HEAD and one ranged GET).

    Raises:
        UsageError: a folder output, or a pickle's name.
        OutputExistsError: it exists and ``overwrite`` is not set.
        OutputError: it exists and is not a loratool output.
    """
    from lora_tools.errors import LoraToolsError

    if kind == "folder":
        remote.refuse_folder(path)
    remote.split(path)  # a bucket and a key
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UsageError(f"Refusing to write '{path}': loratool writes safetensors, and a {path.suffix} name says "
                         "pickle to the tools that load it", hint=Hint("output", "ending in .safetensors", "PATH"))
    if remote.head(path) is None:
        return
    if not overwrite:
        raise ExistsError(f"'{path}' already exists", hint=Hint("overwrite", "to replace it"))
    from lora_tools.io.safetensors import read_header

    try:
        ours = LORATOOL_METADATA_KEY in read_header(path).metadata
    except LoraToolsError:
        ours = False
    if not ours:
        raise OutputError(f"'{path}' already exists and is not an earlier loratool output (no loratool record in "
                          "its header): it will not be replaced; choose another output name.")


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False
