"""Atomic file system steps of every write: recognisable temp names, umask-honouring creation, free-space reservation,
stale-temp cleanup, the final rename (claiming the name, replacing it, or swapping a folder),
and OS errors turned into one-line :class:`~lora_tools.errors.OutputError` messages.

Temporary names are ``.<name>.<pid>-<n>.loratool.partial`` next to the output, so a later run
writing to the same place knows them as ours and whether their writer is still alive.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
import re
import shutil
import sys
import threading
from pathlib import Path

from lora_tools.errors import OutputError, OutputExistsError
from lora_tools.units import format_bytes

logger = logging.getLogger(__name__)

TEMP_SUFFIX = ".loratool.partial"
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-\d+(?:-old)?" + re.escape(TEMP_SUFFIX) + "$")
_counter = itertools.count()

_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EFBIG: "file too large (file system or file size limit)",
    errno.EISDIR: "it is a directory",
    errno.ENOTDIR: "a part of the path is not a directory",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or directory",
    errno.EEXIST: "it already exists",
    errno.ENOTEMPTY: "it is a folder that is not empty",
    errno.EXDEV: "the temporary file is on another file system",
}


def reason(error: OSError) -> str:
    """A short human reason for an OS error."""
    return _REASONS.get(error.errno or 0, (error.strerror or str(error)).lower())


def output_error(path: str | os.PathLike[str], error: OSError) -> OutputError:
    """The one-line error for an OS failure while writing ``path``."""
    return OutputError(f"cannot write '{path}': {reason(error)}.")


def temp_path(final: Path, *, old: bool = False) -> Path:
    """A fresh recognisable temporary name next to ``final`` (owned by this process)."""
    tag = "-old" if old else ""
    return final.parent / f".{final.name}.{os.getpid()}-{next(_counter)}{tag}{TEMP_SUFFIX}"


def create_temp_file(final: Path) -> Path:
    """Create an empty temp file for ``final``, mode 0666 minus the umask (what a plain
    ``open(path, "w")`` gives), never reusing an existing name."""
    while True:
        tmp = temp_path(final)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp


def create_temp_dir(final: Path) -> Path:
    """Create an empty temp folder for ``final``, mode 0777 minus the umask."""
    while True:
        tmp = temp_path(final)
        try:
            os.mkdir(tmp, 0o777)
        except FileExistsError:
            continue
        return tmp


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(final: Path) -> list[Path]:
    """Remove temp files or folders of ours for ``final`` whose writing process is gone.

    Returns:
        The paths removed (each one is logged as a warning).
    """
    removed: list[Path] = []
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TEMP_RE.match(p.name)
        if m is None or m.group("name") != final.name or _alive(int(m.group("pid"))):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError:
            continue
        logger.warning("removed '%s', a temporary file left by an earlier run (process %s) that was killed",
                       p, m.group("pid"))
        removed.append(p)
    return removed


def remove(path: Path) -> None:
    """Remove a file or folder we made (no error when it is gone)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------- renames
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(2)``; ``False`` where the kernel, libc or file system lacks it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def claim(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final`` only if ``final`` does not exist (atomically): the loser of two
    runs writing one output gets :class:`OutputExistsError`, and nothing is replaced."""
    try:
        if _renameat2(tmp, final, _RENAME_NOREPLACE):
            return
        if tmp.is_dir():
            os.mkdir(final)  # the claim; a racing writer fails here
            os.rename(tmp, final)  # onto our own empty folder
        else:
            os.link(tmp, final)
            os.unlink(tmp)
    except FileExistsError:
        raise OutputExistsError(f"'{final}' appeared while this run was writing it (another run?): "
                                "nothing was replaced, and this run's output was dropped.") from None


def replace(tmp: Path, final: Path) -> Path | None:
    """Move ``tmp`` to ``final``, replacing what is there (last finisher wins, whole).

    A folder is swapped with the old one in one step where the kernel allows it.

    Returns:
        The temp path now holding the replaced folder (to remove after every output is
        finalised), or ``None``.
    """
    if tmp.is_dir() and final.is_dir() and not final.is_symlink():
        old = temp_path(final, old=True)
        if _renameat2(tmp, final, _RENAME_EXCHANGE):
            os.rename(tmp, old)
            return old
        os.rename(final, old)
        os.rename(tmp, final)
        return old
    os.replace(tmp, final)
    return None


def fsync_dir(path: Path) -> None:
    """fsync a folder so a rename inside it survives a crash (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------- free space
_reserved: dict[int, int] = {}
_lock = threading.Lock()


def reserve_space(path: Path, nbytes: int) -> int:
    """Reserve ``nbytes`` on ``path``'s file system for a write about to start.

    Outputs of one run that share a file system are counted together.

    Returns:
        The device id to hand back to :func:`release_space`.

    Raises:
        OutputError: ``"not enough space on X: need N, have M"``.
    """
    from lora_tools.io import remote

    if remote.is_url(path):
        return -1  # an object store has no free space to count
    folder = existing_ancestor(path) if not path.parent.is_dir() else path.parent
    try:
        dev = os.stat(folder).st_dev
        free = shutil.disk_usage(folder).free
    except OSError:
        return -1
    with _lock:
        need = _reserved.get(dev, 0) + nbytes
        if need > free:
            raise OutputError(f"not enough space on '{mount_point(folder)}' for '{path}': "
                              f"need {format_bytes(need)}, have {format_bytes(free)}.")
        _reserved[dev] = need
    return dev


def release_space(dev: int, nbytes: int) -> None:
    """Give back a reservation of :func:`reserve_space`."""
    if dev < 0:
        return
    with _lock:
        left = _reserved.get(dev, 0) - nbytes
        if left > 0:
            _reserved[dev] = left
        else:
            _reserved.pop(dev, None)


def mount_point(folder: Path) -> Path:
    """The mount point ``folder`` lies on."""
    p = folder.resolve()
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def existing_ancestor(path: Path) -> Path:
    """The nearest folder above ``path`` that exists (``path`` itself excluded)."""
    p = path.absolute().parent
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def write_text(final: Path, text: str) -> Path:
    """Write a small text file (a JSON report, a workflow) whole or not at all: into a recognisable
    temp file beside ``final``, fsynced, then renamed over it. The caller's plan decided that
    ``final`` may be written or replaced.

    Raises:
        OutputError: an OS error (no space, permission...), naming ``final``.
    """
    remove_stale_temps(final)
    tmp: Path | None = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = create_temp_file(final)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        tmp = None
        fsync_dir(final.parent)
    except OSError as e:
        raise output_error(final, e) from None
    finally:
        if tmp is not None:
            remove(tmp)
    return final
