"""The one error boundary: any exception becomes one line and an exit code.

The CLI (every command) and the recipe runner (each failed job's line) call :func:`describe`; nothing
else turns exceptions into text for people. Torch-free: library errors (torch, diffusers,
transformers, huggingface_hub) are recognised by the module of their type and by their message,
never by importing those libraries.

Exit codes (the README's Reliability section lists them too):

====  ==================================================================================
0     success
1     an input, an output or a value is wrong: every :class:`LoraToolsError` (a hub file that
      cannot be had included: :class:`HubError` says which and how to get it), and every OS
      error on a path (name too long, symbolic-link loop, permission denied, read-only file
      system, disk full, a directory or a file in the way, ...)
2     the command line itself is wrong (click's usage errors)
3     the device asked for is not there (``--device cuda`` on a torch without CUDA, ``mps``
      off a Mac)
4     the network failed inside a library (connection refused, timeout, TLS)
5     a library failed inside its own code (torch, diffusers, transformers, safetensors)
6     out of memory (or refused before loading: ``verify``'s predicted peak is above the available memory)
70    an internal error (a bug): a short line; ``--debug`` shows the traceback
129/130/143  SIGHUP / SIGINT / SIGTERM (nothing left under the output names)
====  ==================================================================================
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass

from lora_tools.errors import DeviceError, LoraToolsError

EXIT_INPUT = 1
EXIT_USAGE = 2
EXIT_DEVICE = 3
EXIT_NETWORK = 4
EXIT_LIBRARY = 5
EXIT_MEMORY = 6
EXIT_INTERNAL = 70

#: errno -> (reason, next step). The reason follows the path; the next step follows a ';'.
_OS_REASONS: dict[int, tuple[str, str]] = {
    errno.ENAMETOOLONG: ("file name too long (at most 255 bytes a name on most file systems)", "choose a shorter name"),
    errno.ELOOP: ("too many levels of symbolic links (a link that points back at itself?)",
                  "fix or remove the link"),
    errno.EACCES: ("permission denied", "check the permissions of the file and its folders, or choose another path"),
    errno.EPERM: ("operation not permitted", "check the permissions and attributes of the file and its folders"),
    errno.EROFS: ("read-only file system", "choose a path on a writable disk"),
    errno.ENOSPC: ("no space left on the device", "free some space or write to another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or write to another disk"),
    errno.EFBIG: ("file too large for the file system", "write to another file system"),
    errno.EISDIR: ("it is a directory", "name a file"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "check the path"),
    errno.ENOENT: ("no such file or directory", "check the path"),
    errno.EEXIST: ("it already exists", "choose another name"),
    errno.ENOTEMPTY: ("it is a folder that is not empty", "choose another name"),
    errno.EXDEV: ("it is on another file system than its temporary file", "write the output on one file system"),
    errno.EIO: ("input/output error", "check the disk or network share, then try again"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) or run fewer jobs at once"),
    errno.ENFILE: ("too many open files in the system", "run fewer jobs at once"),
    errno.ENXIO: ("no such device or address (a special file?)", "name a regular file"),
    errno.ENODEV: ("no such device", "name a regular file"),
    errno.ETXTBSY: ("the file is busy", "try again when the program using it ends"),
    errno.EBUSY: ("the file or device is busy", "try again later"),
    errno.ENOMEM: ("out of memory", "close other programs or use a smaller dtype"),
}

_NETWORK_MODULES = ("requests", "urllib3", "httpx", "httpcore", "socket", "ssl", "aiohttp")
_LIBRARY_MODULES = ("torch", "diffusers", "transformers", "huggingface_hub", "safetensors", "accelerate", "PIL",
                    "numpy", "tokenizers")
_DEVICE_TEXTS = ("torch not compiled with cuda", "found no nvidia driver", "no cuda gpus are available",
                 "mps backend", "the mps backend", "cuda driver version is insufficient", "mps is not available",
                 "invalid device ordinal", "cuda error: no kernel image")


@dataclass(frozen=True)
class Failure:
    """What to tell the user about an exception.

    Attributes:
        message: one line (no ``Error:`` prefix), naming the path or the cause, with a next step.
        exit_code: see the table in this module's docstring.
        kind: ``input``, ``device``, ``network``, ``library``, ``memory`` or ``internal``.
    """

    message: str
    exit_code: int
    kind: str


def one_line(text: str, limit: int | None = 300) -> str:
    """``text`` on one line (whitespace runs become one space), cut to ``limit`` characters (``None``: whole)."""
    line = " ".join(str(text).split())
    return line if limit is None or len(line) <= limit else line[: limit - 3] + "..."


def _module(error: BaseException) -> str:
    return type(error).__module__ or ""


def _from(error: BaseException, prefixes: tuple[str, ...]) -> bool:
    for cls in type(error).__mro__:
        root = (cls.__module__ or "").split(".")[0]
        if root in prefixes:
            return True
    return False


def describe_os_error(error: OSError) -> str:
    """One line for an OS error: the path(s), the reason and a next step."""
    path = error.filename
    reason, step = _OS_REASONS.get(error.errno or 0, ("", ""))
    if not reason:
        reason = one_line(error.strerror or str(error) or type(error).__name__).lower()
    where = ""
    if path is not None:
        where = f"'{os.fsdecode(path)}'"
        if error.filename2 is not None:
            where += f" -> '{os.fsdecode(error.filename2)}'"
        where += ": "
    return f"{where}{reason}" + (f"; {step}." if step else ".")


def _device_text(text: str) -> bool:
    low = text.lower()
    return any(t in low for t in _DEVICE_TEXTS)


def describe(error: BaseException, spell_param: Callable[[str], str] | None = None) -> Failure:
    """The one line and exit code for ``error`` (see the module's table).

    Args:
        error: any exception.
        spell_param: how a library parameter is spelled (the CLI passes its flag table); the Python
            keyword form otherwise.
    """
    if isinstance(error, DeviceError):
        return Failure(one_line(error.render(spell_param), None), EXIT_DEVICE, "device")
    if isinstance(error, LoraToolsError) and isinstance(error, MemoryError):  # a run refused for its predicted peak
        return Failure(one_line(error.render(spell_param), None), EXIT_MEMORY, "memory")
    if isinstance(error, LoraToolsError):
        return Failure(one_line(error.render(spell_param), None), EXIT_INPUT, "input")
    text = one_line(str(error))
    name = type(error).__name__
    if isinstance(error, MemoryError) or name == "OutOfMemoryError" or "out of memory" in text.lower():
        return Failure(f"out of memory ({text or name}); close other programs, use a smaller dtype or a smaller size.",
                       EXIT_MEMORY, "memory")
    if _device_text(text):
        return Failure(f"the device is not available: {text}; choose another device (cpu works everywhere).",
                       EXIT_DEVICE, "device")
    if _from(error, _NETWORK_MODULES) or isinstance(error, (ConnectionError, TimeoutError)):
        return Failure(f"network error: {name}: {text}; check the connection (or work offline with local files) "
                       "and try again.", EXIT_NETWORK, "network")
    if isinstance(error, RuntimeError) and text.startswith("Symlink loop from "):  # pathlib's resolve()
        loop = OSError(errno.ELOOP, "symlink loop", text[len("Symlink loop from "):].strip("'"))
        return Failure(describe_os_error(loop), EXIT_INPUT, "input")
    if isinstance(error, OSError) and (error.errno is not None or error.filename is not None):
        return Failure(describe_os_error(error), EXIT_INPUT, "input")
    if _from(error, _LIBRARY_MODULES) or _raised_in_library(error):
        library = _library_of(error)
        return Failure(f"{library} failed: {name}: {text}; check the input files (run with --debug for the traceback).",
                       EXIT_LIBRARY, "library")
    if isinstance(error, OSError):
        return Failure(f"{name}: {text or 'an operating-system error'}.", EXIT_INPUT, "input")
    return Failure(f"internal error: {name}: {text}; run with --debug for the traceback (and please report it).",
                   EXIT_INTERNAL, "internal")


def _frames(error: BaseException) -> list[str]:
    tb = error.__traceback__
    names = []
    while tb is not None:
        names.append(tb.tb_frame.f_globals.get("__name__", "") or "")
        tb = tb.tb_next
    return names


def _raised_in_library(error: BaseException) -> bool:
    """Whether the innermost frame of ``error`` is library code (a ValueError raised by diffusers)."""
    frames = _frames(error)
    return bool(frames) and frames[-1].split(".")[0] in _LIBRARY_MODULES


def _library_of(error: BaseException) -> str:
    for cls in type(error).__mro__:
        root = (cls.__module__ or "").split(".")[0]
        if root in _LIBRARY_MODULES:
            return root
    for name in reversed(_frames(error)):
        root = name.split(".")[0]
        if root in _LIBRARY_MODULES:
            return root
    return "a library"


__all__ = [
    "EXIT_DEVICE",
    "EXIT_INPUT",
    "EXIT_INTERNAL",
    "EXIT_LIBRARY",
    "EXIT_MEMORY",
    "EXIT_NETWORK",
    "EXIT_USAGE",
    "Failure",
    "describe",
    "describe_os_error",
    "one_line",
]
