"""Inputs are opened only if they are regular files or folders.

A named pipe (FIFO) blocks whoever opens it until a writer comes; a device or a socket is no model.
:func:`refuse_special` is called at every place an input is opened (the safetensors header reader,
the tensor-source opener, the recipe loader, the prompt list), before the ``open``, so such a path
gets one line and never blocks.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lora_tools.errors import InvalidFileError

_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def special_kind(path: str | os.PathLike[str]) -> str | None:
    """What ``path`` is when it is neither a regular file nor a folder (``a named pipe (FIFO)``...), else
    ``None`` (also when it does not exist or cannot be looked at: the open that follows says why)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    for test, name in _KINDS:
        if test(mode):
            return name
    return None


def refuse_special(path: str | os.PathLike[str], what: str = "regular file") -> None:
    """Raise :class:`InvalidFileError` when ``path`` is a FIFO, a device or a socket (without opening it).

    Args:
        path: the input about to be opened.
        what: what to name instead (``regular file``, ``prompt file``), for the message.
    """
    kind = special_kind(path)
    if kind is not None:
        raise InvalidFileError(f"'{Path(path)}' is {kind}, not a regular file: name a {what}.")


__all__ = ["refuse_special", "special_kind"]
