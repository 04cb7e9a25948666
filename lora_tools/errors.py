"""Exception types of lora_tools.

Every error the library raises on purpose derives from :class:`LoraToolsError`. Subclasses also
derive from the matching builtin, so callers can catch either. The CLI turns these into one-line
``Error: ...`` messages; nothing else in the library formats errors for people.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Hint:
    """A way out that names a *parameter*, never a CLI flag.

    The library renders it as ``pass overwrite=True to replace it``; the CLI's one translator
    (``lora_tools.cli``) renders the same hint with the flag (``pass --overwrite to replace it``).

    Attributes:
        param: the keyword parameter of the library call (``overwrite``, ``force``, ``output``...).
        purpose: what passing it does (``"to replace it"``).
        value: how the value is spelled (``"PATH"``); ``None`` for a boolean switch (``True``).
    """

    param: str
    purpose: str = ""
    value: str | None = None
    #: The other parameters of which exactly one is needed (``pass exactly one of ...``), e.g. the rank rules.
    alternatives: tuple[str, ...] = ()

    def render(self, spelling: str | None = None, spell: Callable[[str], str | None] | None = None) -> str:
        """``pass <spelling> <purpose>``; ``spelling`` defaults to the Python keyword form. A spelling that is
        not a flag (an argument such as ``LORA[:W]``) takes no value after it. With ``alternatives``,
        ``spell`` spells each (``None``: not a parameter of that caller, left out)."""
        if self.alternatives:
            names = [self.param, *self.alternatives]
            parts = [f"{n}=..." for n in names] if spell is None else [x for x in map(spell, names) if x]
            return f"pass exactly one of {', '.join(parts)} {self.purpose}".rstrip()
        if spelling is None:
            spelling = f"{self.param}={self.value if self.value is not None else 'True'}"
        elif self.value is not None and spelling.startswith("-"):
            spelling = f"{spelling} {self.value}"
        return f"pass {spelling} {self.purpose}".rstrip()


class LoraToolsError(Exception):
    """Root of every error lora_tools raises on purpose.

    Args:
        message: one line that names the file or value and what is wrong with it.
        hint: an optional way out naming a parameter (see :class:`Hint`); appended as ``"; pass ..."``.
    """

    def __init__(self, message: str = "", *args: object, hint: Hint | None = None) -> None:
        super().__init__(message, *args)
        self.message = message
        self.hint = hint

    def render(self, spell_param: object | None = None) -> str:
        """The message with its hint; ``spell_param(name) -> str | None`` spells a parameter
        (the CLI passes its flag table); the Python keyword form otherwise."""
        if self.hint is None:
            return self.message
        spell = spell_param if callable(spell_param) else None
        spelling = spell(self.hint.param) if spell is not None else None
        if spell is not None and spelling == "" and not self.hint.alternatives:
            return self.message  # the caller has no such parameter: no way out to name
        return f"{self.message.rstrip('.')}; {self.hint.render(spelling, spell)}."

    def __str__(self) -> str:
        return self.render()


class InvalidFileError(LoraToolsError, ValueError):
    """A file is not what it claims to be (truncated, corrupt header, wrong container)."""


class UnsafeFileError(LoraToolsError, ValueError):
    """Loading the file would require executing untrusted code (a full pickle)."""


class UnknownFormatError(LoraToolsError, ValueError):
    """The keys of a LoRA or checkpoint match no format lora_tools knows."""


class UnsupportedModelError(LoraToolsError, ValueError):
    """The file is understood, but lora_tools does not support this model family."""


class NonFiniteError(InvalidFileError):
    """A file holds NaN or Inf values (or its maths would overflow the output dtype)."""


class KeyMismatchError(LoraToolsError, KeyError):
    """Keys are missing or left over in a conversion or a LoRA-to-model match."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.render()


class ShapeMismatchError(LoraToolsError, ValueError):
    """A LoRA module does not fit the shape of the tensor it targets."""


class OutputExistsError(LoraToolsError, FileExistsError):
    """An output file already exists and overwriting was not asked for."""


class HubError(LoraToolsError, OSError):
    """A file could not be resolved through the Hugging Face hub (offline, missing, denied)."""


class UsageError(LoraToolsError, ValueError):
    """Arguments that make no sense together (reported like a bad input, exit 1)."""


class OutputError(LoraToolsError, OSError):
    """An output cannot be written (no space, read-only, a directory in the way...)."""


class RecipeError(LoraToolsError, ValueError):
    """A recipe file is invalid; ``location`` is ``file:line:column`` where known."""

    def __init__(self, message: str = "", *args: object, location: str | None = None, hint: Hint | None = None) -> None:
        super().__init__(message, *args, hint=hint)
        self.location = location

    def render(self, spell_param: object | None = None) -> str:
        text = super().render(spell_param)
        return f"{self.location}: {text}" if self.location else text


class DeviceError(LoraToolsError, RuntimeError):
    """The device asked for is not there (CUDA on a torch built without it, MPS off a Mac)."""


class MemoryNeedError(LoraToolsError, MemoryError):
    """A run would need more memory than there is, known before anything loads (exit 6, as out of memory)."""


class ClusterError(LoraToolsError, ConnectionError):
    """A distributed executor cannot reach or join its cluster."""
