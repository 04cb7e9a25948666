"""The pictures ``verify`` writes: a grid with a title (model, preset, settings, verdict) and labels scaled to the
images; with ``--against``, a comparison of both sides and their difference; ``report.md`` reads as a report."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image, ImageChops

from lora_tools.cli import cli
from lora_tools.verify.grid import (
    DIFF_GAIN,
    TITLE_LINES,
    font_size,
    grid_size,
    header_height,
    label_width,
    make_comparison,
    make_grid,
)


def test_labels_scale_with_the_images(tmp_path: Path) -> None:
    assert font_size(32) < font_size(1024) and header_height(1024) > header_height(32)
    small = Image.new("RGB", (32, 32), "gray")
    path = make_grid([[small]], ["a cat"], [0], tmp_path / "g.png", title="model | lightning-4step | PASS")
    grid = Image.open(path).convert("RGB")
    assert grid.size == grid_size(1, 1, (32, 32))
    title_band = grid.crop((0, 0, grid.width, font_size(32) + 4))
    assert title_band.getextrema() != ((255, 255),) * 3  # something is written there


def test_a_long_title_keeps_its_verdict_and_every_column_its_label(tmp_path: Path) -> None:
    """At the demo's 32 px cells: the title's three lines (the verdict on its own, in green) fit a grid made wide
    enough for them, and each of the three columns has a label above it."""
    title = ("community-checkpoint-lightning-4step-style-lora.safetensors | lightning-4step | "
             "EulerDiscreteScheduler trailing, 4 steps, CFG 0 | PASS: PSNR 83.5 dB (threshold 50 dB) vs base + LoRAs")
    cell = Image.new("RGB", (32, 32), "gray")
    picture = Image.open(make_comparison([cell], [cell], ["a cat (seed 0)"], tmp_path / "c.png", title=title))
    picture = picture.convert("RGB")
    assert picture.size == grid_size(1, 3, (32, 32)) and picture.width >= 400
    line = font_size(32) + 4
    bands = [picture.crop((0, 2 + i * line, picture.width, 2 + (i + 1) * line)) for i in range(TITLE_LINES)]
    green = [any(g > 80 and r < 60 and b < 60 for r, g, b in band.getdata()) for band in bands]
    assert green == [False, False, True]  # the verdict is the third line, and only it is green
    assert all(band.getbbox() is not None for band in (ImageChops.invert(b) for b in bands))  # no empty line
    left, top = label_width(32), header_height(32)
    for c in range(3):
        label = picture.crop((left + c * 32, 2 + TITLE_LINES * line, left + (c + 1) * 32, top)).convert("L")
        assert min(label.getdata()) < 128, f"column {c} has no label"


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


def test_the_readme_shows_the_demo_comparison_picture() -> None:
    """docs/verify-grid.png (``python docs/make_images.py``): in the README, small, and the comparison grid of the
    demo's verify step at 128x128: title with a green verdict, three columns, the difference map dark."""
    root = Path(__file__).resolve().parents[1]
    assert "](docs/verify-grid.png)" in (root / "README.md").read_text()
    path = root / "docs" / "verify-grid.png"
    assert path.stat().st_size < 300_000
    picture = Image.open(path).convert("RGB")
    assert picture.size == grid_size(1, 3, (128, 128))
    line = font_size(128) + 4
    verdict = picture.crop((0, 2 + 2 * line, picture.width, 2 + 3 * line))
    assert any(g > 80 and r < 60 and b < 60 for r, g, b in verdict.getdata())
    left, top = label_width(128), header_height(128)
    model, reference, diff = (picture.crop((left + i * 128, top, left + (i + 1) * 128, top + 128)) for i in range(3))
    assert len(set(model.getdata())) > 1000 and len(set(reference.getdata())) > 1000  # renders, not blanks
    assert max(max(px) for px in diff.getdata()) < 64  # fused and runtime LoRAs agree: the x10 difference is dark


def test_report_md_names_what_an_fp8_file_was_checked_against() -> None:
    """An fp8 file against its fp16 one: the report names that file, not "its base with the LoRAs" (there are
    none), and a failed verdict says the model does not render like it."""
    from lora_tools.verify.report import ImageResult, VerifyReport

    settings = {"scheduler": "EulerDiscreteScheduler", "steps": 4, "timesteps": [999, 749, 499, 249],
                "guidance_scale": 0.0, "prediction_type": "epsilon"}
    image = ImageResult("a cat", 0, 1.0, [0.25] * 4, psnr_db=41.7)
    against = {"base": "/x/fused.safetensors", "loras": []}
    threshold = {"psnr_db": 30.0, "weights": "fp8 scaled"}
    report = VerifyReport({"path": "/x/fused-fp8.safetensors"}, "lightning-4step", settings, "cpu", "fp32", [image],
                          verdict="pass", threshold=threshold, against=against)
    md = report.markdown()
    assert "The model renders like fused.safetensors: worst PSNR 41.7 dB" in md and "runtime LoRAs" not in md
    assert "- Compared with: fused.safetensors\n" in md
    report.verdict = "fail"
    assert "**Verdict: FAIL.** The model does not render like fused.safetensors" in report.markdown()
