"""A labelled image grid: one row per prompt, one column per seed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["HEADER_HEIGHT", "grid_size", "label_width", "make_grid"]

#: Height of the row of seed labels above the images.
HEADER_HEIGHT = 16


def label_width(cell_width: int) -> int:
    """Width of the prompt-label column left of the images."""
    return max(96, cell_width)


def grid_size(rows: int, cols: int, cell: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of a grid of ``rows`` prompts x ``cols`` seeds of ``cell``-sized images."""
    w, h = cell
    return label_width(w) + cols * w, HEADER_HEIGHT + rows * h


def make_grid(images: Sequence[Sequence[Any]], prompts: Sequence[str], seeds: Sequence[int | str], path: str | Path,
              *, column_label: str = "seed") -> Path:
    """Paste ``images[row][col]`` (PIL images of one size) into a grid labelled with prompts and seeds, save a PNG.

    A column whose entry in ``seeds`` is a string is labelled with that string alone.
    """
    from PIL import Image, ImageDraw

    w, h = images[0][0].size
    grid = Image.new("RGB", grid_size(len(prompts), len(seeds), (w, h)), "white")
    draw = ImageDraw.Draw(grid)
    left = label_width(w)
    for c, seed in enumerate(seeds):
        draw.text((left + c * w + 2, 2), seed if isinstance(seed, str) else f"{column_label} {seed}", fill="black")
    for r, prompt in enumerate(prompts):
        top = HEADER_HEIGHT + r * h
        draw.text((2, top + 2), _wrap(prompt, left), fill="black")
        for c in range(len(seeds)):
            grid.paste(images[r][c], (left + c * w, top))
    out = Path(path)
    grid.save(out)
    return out


def _wrap(text: str, width: int) -> str:
    """Break a label into lines of about ``width / 6`` characters (the default bitmap font)."""
    per_line = max(8, width // 6)
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > per_line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "\n".join(lines[:6])
