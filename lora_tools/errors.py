"""Exception types of lora_tools.

Every error the library raises on purpose derives from :class:`LoraToolsError`. Subclasses also
derive from the matching builtin, so callers can catch either. The CLI turns these into one-line
``Error: ...`` messages; nothing else in the library formats errors for people.
"""

from __future__ import annotations


class LoraToolsError(Exception):
    """Root of every error lora_tools raises on purpose."""


class InvalidFileError(LoraToolsError, ValueError):
    """A file is not what it claims to be (truncated, corrupt header, wrong container)."""


class UnsafeFileError(LoraToolsError, ValueError):
    """Loading the file would require executing untrusted code (a full pickle)."""


class UnknownFormatError(LoraToolsError, ValueError):
    """The keys of a LoRA or checkpoint match no format lora_tools knows."""


class UnsupportedModelError(LoraToolsError, ValueError):
    """The file is understood, but lora_tools does not support this model family."""


class KeyMismatchError(LoraToolsError, KeyError):
    """Keys are missing or left over in a conversion or a LoRA-to-model match."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ShapeMismatchError(LoraToolsError, ValueError):
    """A LoRA module does not fit the shape of the tensor it targets."""


class OutputExistsError(LoraToolsError, FileExistsError):
    """An output file already exists and overwriting was not asked for."""


class HubError(LoraToolsError, OSError):
    """A file could not be resolved through the Hugging Face hub (offline, missing, denied)."""


class UsageError(LoraToolsError, ValueError):
    """Arguments that make no sense together (reported like a bad input, exit 1)."""
