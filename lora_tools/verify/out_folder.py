"""verify's output folder is all or nothing, and replaces only an earlier verify output.

Planned with :func:`check_out_folder` (before anything loads) and written with :func:`written_whole`:
every file (images, grid, ``report.json``/``report.md``, ``workflow.json``) goes into a temp folder
beside the target (``output.atomic`` names, cleaned by the next run when its writer died), which is
then claimed (new name) or swapped in (an earlier verify output of ours). A failure leaves nothing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from lora_tools.errors import Hint, LoraToolsError, OutputError, OutputExistsError, UsageError
from lora_tools.io import atomic
from lora_tools.testing.hooks import pause_point

#: What a verify folder of ours holds (besides PNG files in ``images/``).
VERIFY_FILES = frozenset({"grid.png", "comparison.png", "report.json", "report.md", "workflow.json"})


def not_ours(folder: Path) -> str | None:
    """Why ``folder`` is not an earlier verify output of ours, or ``None`` when it is (or is empty)."""
    if folder.is_symlink():
        return "it is a symbolic link"
    for entry in folder.iterdir():
        if entry.is_symlink():
            return f"it holds a symbolic link '{entry.name}'"
        if entry.is_dir():
            if entry.name != "images":
                return f"it holds a folder loratool does not write ('{entry.name}')"
            for image in entry.iterdir():
                if image.is_symlink() or not image.is_file() or image.suffix != ".png":
                    return f"it holds files loratool does not write (such as 'images/{image.name}')"
        elif entry.name not in VERIFY_FILES:
            return f"it holds files loratool does not write (such as '{entry.name}')"
    return None


def _relation(out: Path, source: Path) -> str | None:
    if out == source:
        return "is"
    if out in source.parents:
        return "holds"
    if source in out.parents:
        return "lies inside"
    return None


def check_out_folder(out: Path, *, overwrite: bool, inputs: Iterable[str | os.PathLike[str]] = ()) -> None:
    """Check at plan time that ``out`` can become verify's output folder.

    Raises:
        UsageError: ``out`` is, holds or lies inside one of ``inputs`` (after resolving links and ``..``).
        OutputError: a file is in the way, the name is too long, the folder cannot be written, or it exists
            and is not an earlier verify output of ours (never replaced).
        OutputExistsError: it holds an earlier report and ``overwrite`` is not set.
    """
    resolved = out.resolve()
    for p in inputs:
        relation = _relation(resolved, Path(p).resolve())
        if relation is not None:
            raise UsageError(f"Refusing to write '{out}': it {relation} the input '{p}'; choose another output folder.")
    from lora_tools.output.plan import check_place

    check_place(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputError(f"cannot write '{out}': it is a file (the output is a folder).")
        why = not_ours(out)
        if why is not None:
            raise OutputError(f"'{out}' already exists and is not an earlier verify output ({why}): it will not be "
                              "replaced; choose another output folder.")
        if (out / "report.json").exists() and not overwrite:
            raise OutputExistsError(f"{out} already holds a verify report", hint=Hint("overwrite", "to replace it"))


@contextlib.contextmanager
def written_whole(out: Path) -> Iterator[Path]:
    """Yield a fresh temp folder beside ``out``; on success it becomes ``out`` (claimed, or swapped with
    an earlier verify output of ours), on any failure it is removed and ``out`` is as it was.

    Raises:
        OutputError: an OS error while writing (no space, permission...), naming ``out``.
        OutputExistsError: ``out`` appeared meanwhile (another run) or is no longer ours.
    """
    atomic.remove_stale_temps(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = atomic.create_temp_dir(out)
    except OSError as e:
        raise atomic.output_error(out, e) from None
    try:
        yield tmp
        pause_point("before-rename")
        if out.exists() or out.is_symlink():
            why = not_ours(out) if out.is_dir() else "it is a file"
            if why is not None:
                raise OutputExistsError(f"'{out}' changed while this run was writing ({why}): nothing was replaced.")
            old = atomic.replace(tmp, out)
            if old is not None:
                atomic.remove(old)
        else:
            atomic.claim(tmp, out)
        atomic.fsync_dir(out.parent)
    except OSError as e:
        atomic.remove(tmp)
        if isinstance(e, LoraToolsError):
            raise
        raise atomic.output_error(out, e) from None
    except BaseException:
        atomic.remove(tmp)
        raise


__all__ = ["check_out_folder", "written_whole", "not_ours", "VERIFY_FILES"]
