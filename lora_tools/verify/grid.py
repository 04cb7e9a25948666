"""A labelled image grid: a title (model, settings, verdict), one row per prompt, one column per seed; labels
in a font scaled to the images. :func:`make_comparison` puts the model, what it is checked against (the base with
its runtime LoRAs, or an fp8 model's fp16 file) and their difference side by side."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["HEADER_HEIGHT", "DIFF_GAIN", "LABEL_LINES", "TITLE_LINES", "TITLE_CHARS", "font_size", "grid_size",
           "header_height", "label_width", "make_comparison", "make_grid"]

#: Lines of the title (model and preset, sampler settings, verdict) and of the column labels.
TITLE_LINES = 3
LABEL_LINES = 2
#: Height above the images at the smallest font (cells up to 400 px wide): title and column labels.
HEADER_HEIGHT = (TITLE_LINES + LABEL_LINES) * (10 + 4) + 6
#: The difference map's amplification (differences of a few levels would be black).
DIFF_GAIN = 10
#: The title's width in characters that a grid is at least as wide as (small images get white space on the right).
TITLE_CHARS = 80


def font_size(cell_width: int) -> int:
    """The labels' font size: readable at 32 px cells, in proportion at 1024."""
    return max(10, round(cell_width / 40))


def header_height(cell_width: int) -> int:
    """Height above the images: the title's lines and the column labels' lines."""
    return (TITLE_LINES + LABEL_LINES) * (font_size(cell_width) + 4) + 6


def label_width(cell_width: int) -> int:
    """Width of the prompt-label column left of the images."""
    return max(96, cell_width)


def grid_size(rows: int, cols: int, cell: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of a grid of ``rows`` prompts x ``cols`` seeds of ``cell``-sized images: at least as wide
    as the title needs."""
    w, h = cell
    return max(label_width(w) + cols * w, _min_width(w)), header_height(w) + rows * h


def _min_width(cell_width: int) -> int:
    return round(TITLE_CHARS * font_size(cell_width) * 0.55)


def make_grid(images: Sequence[Sequence[Any]], prompts: Sequence[str], seeds: Sequence[int | str], path: str | Path,
              *, column_label: str = "seed", title: str = "") -> Path:
    """Paste ``images[row][col]`` (PIL images of one size) into a grid labelled with prompts and seeds under
    ``title``, save a PNG. A column whose entry in ``seeds`` is a string is labelled with that string alone.

    The title's ``" | "``-separated parts fill :data:`TITLE_LINES` lines (a part with PASS or FAIL in green or
    red); each column's label is centred over it on up to :data:`LABEL_LINES` lines."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = images[0][0].size
    size = font_size(w)
    font = ImageFont.load_default(size=size)
    line = size + 4
    grid = Image.new("RGB", grid_size(len(prompts), len(seeds), (w, h)), "white")
    draw = ImageDraw.Draw(grid)
    left, top0 = label_width(w), header_height(w)
    for i, text in enumerate(_title_lines(title, grid.width - 4, font.getlength)):
        colour = "darkgreen" if "PASS" in text else "firebrick" if "FAIL" in text else "black"
        draw.text((2, 2 + i * line), text, fill=colour, font=font)
    labels_top = 2 + TITLE_LINES * line + 2
    for c, seed in enumerate(seeds):
        label = seed if isinstance(seed, str) else f"{column_label} {seed}"
        for i, text in enumerate(_lines(label, w - 2, font.getlength, LABEL_LINES)):
            x = left + c * w + max(1, (w - font.getlength(text)) / 2)
            draw.text((x, labels_top + i * line), text, fill="black", font=font)
    for r, prompt in enumerate(prompts):
        top = top0 + r * h
        rows = max(1, h // line)
        draw.text((2, top + 2), "\n".join(_lines(prompt, left - 6, font.getlength, rows)), fill="black", font=font)
        for c in range(len(seeds)):
            grid.paste(images[r][c], (left + c * w, top))
    out = Path(path)
    grid.save(out)
    return out


def make_comparison(model: Sequence[Any], reference: Sequence[Any], labels: Sequence[str], path: str | Path,
                    *, title: str = "", reference_label: str = "base + LoRAs") -> Path:
    """One row per image: the model's render, the reference's (base + runtime LoRAs, or the file an fp8 model is
    checked against), and their difference amplified :data:`DIFF_GAIN` times; rows labelled with ``labels``
    (prompt and seed)."""
    from PIL import ImageChops

    rows = [[m, r, ImageChops.difference(m, r).point(lambda v: min(255, v * DIFF_GAIN))]
            for m, r in zip(model, reference, strict=True)]
    columns = ["model", reference_label, f"difference x{DIFF_GAIN}"]
    return make_grid(rows, labels, columns, path, title=title)


def _title_lines(title: str, width: float, measure: Callable[[str], float]) -> list[str]:
    """The title's ``" | "`` parts joined into lines of at most ``width`` px (a part too long is broken), at most
    :data:`TITLE_LINES` lines; the verdict part starts a line of its own."""
    lines: list[str] = []
    for part in (p.strip() for p in title.split(" | ") if p.strip()):
        joined = f"{lines[-1]} | {part}" if lines else part
        if lines and measure(joined) <= width and not any(v in part for v in ("PASS", "FAIL")):
            lines[-1] = joined
        else:
            lines += _lines(part, width, measure, TITLE_LINES)
    if len(lines) > TITLE_LINES:  # what does not fit ends the last line in "…"
        lines[TITLE_LINES - 1] = _cut(" ".join(lines[TITLE_LINES - 1:]) + "…", width, measure, suffix="…")
    return lines[:TITLE_LINES]


def _lines(text: str, width: float, measure: Callable[[str], float], most: int) -> list[str]:
    """``text`` broken at spaces into at most ``most`` lines of at most ``width`` px; a word wider than that is
    cut, and the last line ends in "…" when text is left over."""
    lines: list[str] = []
    for word in text.split():
        if lines and measure(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    lines = [_cut(x, width, measure) for x in lines]
    if len(lines) > most:
        lines = lines[:most]
        lines[-1] = _cut(lines[-1] + "…", width, measure, suffix="…")
    return lines


def _cut(text: str, width: float, measure: Callable[[str], float], suffix: str = "") -> str:
    """``text`` shortened from the end until it fits ``width`` px (``suffix`` kept)."""
    while len(text) > 1 and measure(text) > width:
        text = text[:-2] + suffix if suffix else text[:-1]
    return text
