"""The pictures ``verify`` writes: a grid with a title (model, preset, settings, verdict) and labels scaled to the
images; with ``--against``, a comparison of both sides and their difference; ``report.md`` reads as a report."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image, ImageChops

from lora_tools.cli import cli
from lora_tools.verify.grid import DIFF_GAIN, font_size, grid_size, header_height, label_width, make_grid


def test_labels_scale_with_the_images(tmp_path: Path) -> None:
    assert font_size(32) < font_size(1024) and header_height(1024) > header_height(32)
    small = Image.new("RGB", (32, 32), "gray")
    path = make_grid([[small]], ["a cat"], [0], tmp_path / "g.png", title="model | lightning-4step | PASS")
    grid = Image.open(path).convert("RGB")
    assert grid.size == grid_size(1, 1, (32, 32))
    title_band = grid.crop((0, 0, grid.width, font_size(32) + 4))
    assert title_band.getextrema() != ((255, 255),) * 3  # something is written there


@pytest.mark.diffusers
def test_against_writes_both_sides_and_a_difference_map(micro_verify: dict[str, Path]) -> None:
    out = micro_verify["dir"] / "pictures"
    run = CliRunner().invoke(cli, ["verify", str(micro_verify["half"]), "--against", str(micro_verify["base"]),
                                   "--lora", f"{micro_verify['lora']}:1.0", "--config", str(micro_verify["config"]),
                                   "--size", "32x32", "--prompt", "a cat", "--seeds", "0", "--device", "cpu",
                                   "--dtype", "fp32", "--out", str(out)])
    assert run.exit_code == 1 and "Verdict:  FAIL" in run.output  # half strength: the sides differ, visibly
    comparison = Image.open(out / "comparison.png").convert("RGB")
    assert comparison.size == grid_size(1, 3, (32, 32))
    left, top = label_width(32), header_height(32)
    model, reference, diff = (comparison.crop((left + i * 32, top, left + (i + 1) * 32, top + 32)) for i in range(3))
    assert model.tobytes() == Image.open(out / "images" / "p0-seed0.png").convert("RGB").tobytes()
    expected = ImageChops.difference(model, reference).point(lambda v: min(255, v * DIFF_GAIN))
    assert diff.tobytes() == expected.tobytes() and diff.getextrema() != ((0, 0),) * 3
    md = (out / "report.md").read_text()
    assert "**Verdict: FAIL.**" in md and "{" not in md and "![comparison](comparison.png)" in md
    assert f"- Compared with: {micro_verify['base'].name} + {micro_verify['lora'].name} at 1" in md
