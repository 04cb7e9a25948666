"""A labelled image grid: a title (model, settings, verdict), one row per prompt, one column per seed; labels
in a font scaled to the images. :func:`make_comparison` puts the fused model, the base with its runtime LoRAs
and their difference side by side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["HEADER_HEIGHT", "DIFF_GAIN", "font_size", "grid_size", "header_height", "label_width", "make_comparison",
           "make_grid"]

#: Height of the title (two lines) and the column labels above the images, at the smallest font.
HEADER_HEIGHT = 42
#: The difference map's amplification (differences of a few levels would be black).
DIFF_GAIN = 10


def font_size(cell_width: int) -> int:
    """The labels' font size: readable at 32 px cells, in proportion at 1024."""
    return max(10, round(cell_width / 40))


def header_height(cell_width: int) -> int:
    """Height above the images: two title lines and one line of column labels."""
    return max(HEADER_HEIGHT, 3 * (font_size(cell_width) + 4))


def label_width(cell_width: int) -> int:
    """Width of the prompt-label column left of the images."""
    return max(96, cell_width)


def grid_size(rows: int, cols: int, cell: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of a grid of ``rows`` prompts x ``cols`` seeds of ``cell``-sized images."""
    w, h = cell
    return label_width(w) + cols * w, header_height(w) + rows * h


def make_grid(images: Sequence[Sequence[Any]], prompts: Sequence[str], seeds: Sequence[int | str], path: str | Path,
              *, column_label: str = "seed", title: str = "") -> Path:
    """Paste ``images[row][col]`` (PIL images of one size) into a grid labelled with prompts and seeds under
    ``title``, save a PNG. A column whose entry in ``seeds`` is a string is labelled with that string alone."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = images[0][0].size
    size = font_size(w)
    font = ImageFont.load_default(size=size)
    line = size + 4
    grid = Image.new("RGB", grid_size(len(prompts), len(seeds), (w, h)), "white")
    draw = ImageDraw.Draw(grid)
    left, top0 = label_width(w), header_height(w)
    chars = max(8, int(grid.width / (size * 0.6)))
    for i, text in enumerate(_wrap(title, chars).splitlines()[:2] if title else []):
        draw.text((2, 2 + i * line), text, fill="black", font=font)
    for c, seed in enumerate(seeds):
        label = seed if isinstance(seed, str) else f"{column_label} {seed}"
        draw.text((left + c * w + 2, top0 - line), _fit(label, w, size), fill="black", font=font)
    for r, prompt in enumerate(prompts):
        top = top0 + r * h
        draw.text((2, top + 2), _wrap(prompt, max(8, int(left / (size * 0.6)))), fill="black", font=font)
        for c in range(len(seeds)):
            grid.paste(images[r][c], (left + c * w, top))
    out = Path(path)
    grid.save(out)
    return out


def make_comparison(model: Sequence[Any], reference: Sequence[Any], labels: Sequence[str], path: str | Path,
                    *, title: str = "") -> Path:
    """One row per image: the model's render, the reference's (base + runtime LoRAs), and their difference
    amplified :data:`DIFF_GAIN` times; rows labelled with ``labels`` (prompt and seed)."""
    from PIL import ImageChops

    rows = [[m, r, ImageChops.difference(m, r).point(lambda v: min(255, v * DIFF_GAIN))]
            for m, r in zip(model, reference, strict=True)]
    columns = ["fused model", "base + LoRAs", f"difference x{DIFF_GAIN}"]
    return make_grid(rows, labels, columns, path, title=title)


def _fit(text: str, width: int, size: int) -> str:
    """``text`` cut to what fits in ``width`` pixels at font ``size``."""
    room = max(3, int(width / (size * 0.6)))
    return text[:room]


def _wrap(text: str, per_line: int) -> str:
    """Break a label into lines of about ``per_line`` characters."""
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > per_line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "\n".join(lines[:6])
