"""Units shown to people, the same in CLI text and library messages."""

from __future__ import annotations

_BINARY_UNITS = (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def format_bytes(n: float) -> str:
    """A size in binary units, the same for every command: ``512 B``, ``48.6 MiB``, ``6.5 GiB``."""
    for unit, factor in _BINARY_UNITS:
        if abs(n) >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{int(n)} B"
