"""How the CLI shows things to people: file-derived text made safe (sizes: :func:`lora_tools.units.format_bytes`).

Every string that comes from a file (metadata values, key names, file names) goes through
:func:`safe_text` before it reaches a terminal: control characters (ESC/CSI/OSC, BEL, BS, CR,
newlines, C1 controls, DEL) are shown escaped, so a file can neither clear the screen, set the
window title nor forge report rows; long values are cut. JSON output needs none of this (JSON
escapes control characters itself).
"""

from __future__ import annotations

#: The longest file-derived string shown on one line (longer ones end in "…").
TEXT_LIMIT = 200


def safe_text(value: object, limit: int = TEXT_LIMIT) -> str:
    """``value`` as one printable line: control characters escaped (``\\x1b``, ``\\n``), cut to ``limit``."""
    text = str(value)
    out: list[str] = []
    for ch in text:
        code = ord(ch)
        if ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif code < 0x20 or code == 0x7F or 0x80 <= code < 0xA0:
            out.append(f"\\x{code:02x}")
        elif code in (0x2028, 0x2029, 0x202E, 0x2066, 0x2067, 0x2068, 0x2069, 0x202A, 0x202B, 0x202C, 0x202D):
            out.append(f"\\u{code:04x}")  # line separators and bidi overrides can forge rows too
        else:
            out.append(ch)
    line = "".join(out)
    return line if len(line) <= limit else line[: limit - 1] + "…"
