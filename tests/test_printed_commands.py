"""Every ``loratool ...`` command the demo prints (and the README's demo block repeats) runs as printed,
from the folder the user ran the demo in."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from lora_tools.cli import cli

README = Path(__file__).resolve().parents[1] / "README.md"
_COMMAND = re.compile(r"(?:^|: )(loratool .+)$")


def printed_commands(text: str) -> list[list[str]]:
    """The argv (without ``loratool``) of each command line in ``text``."""
    found = []
    for line in text.splitlines():
        m = _COMMAND.search(line.strip())
        if m:
            found.append(shlex.split(m.group(1))[1:])
    return found


def readme_demo_block() -> str:
    text = README.read_text()
    start = text.index("`loratool demo` builds")
    block = text[text.index("```", start) + 3:]
    return block[:block.index("```")]


def _run(argv: list[str]) -> str:
    result = CliRunner().invoke(cli, argv, catch_exceptions=False)
    assert result.exit_code == 0, f"loratool {shlex.join(argv)}\n{result.output}"
    return result.output


@pytest.mark.diffusers  # the demo's step 4 checks against diffusers' own fusion
def test_the_demo_commands_run_as_printed(demo_rerun_no_render: SimpleNamespace, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``demo --no-render`` prints (conftest's session run), run in a copy of its folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = demo_rerun_no_render.stdout
    assert demo_rerun_no_render.returncode == 0, demo_rerun_no_render.stderr
    commands = printed_commands(out)
    assert [c[0] for c in commands] == ["fuse", "fuse", "inspect"], out
    fused = demo_rerun_no_render.copy_to(tmp_path) / "community-checkpoint-lightning-4step-style-lora.safetensors"
    fp8 = fused.with_name(fused.stem + "-fp8.safetensors")
    before, before_fp8 = fused.stat().st_mtime_ns, fp8.stat().st_mtime_ns
    for argv in commands:
        _run(argv)
    assert fused.stat().st_mtime_ns != before  # the printed fuse really ran again
    assert fp8.stat().st_mtime_ns != before_fp8 and fp8.stat().st_size < fused.stat().st_size * 0.65  # and the fp8 one (convs stay fp16)


def test_the_readme_demo_block_is_what_the_demo_prints() -> None:
    from lora_tools.cli.demo import DEMO_PROMPT, DEMO_SIZE, command

    block = readme_demo_block()
    commands = printed_commands(block)
    assert [c[0] for c in commands] == ["fuse", "verify", "fuse", "verify", "inspect"]
    folder = Path("demo-output")
    base, lightning = folder / "community-checkpoint.safetensors", folder / "SDXL-Lightning"
    style = folder / "style-lora.safetensors"
    fused = folder / "community-checkpoint-lightning-4step-style-lora.safetensors"
    fp8 = folder / "community-checkpoint-lightning-4step-style-lora-fp8.safetensors"
    assert commands[0] == shlex.split(command("fuse", base, "--lightning", "4", "--preset-dir", lightning, "--lora",
                                              f"{style}:0.6", "--save", "checkpoint", "--save", "unet", "--save",
                                              "diffusers", "--overwrite"))[1:]
    assert commands[2] == shlex.split(command("fuse", base, "--lightning", "4", "--preset-dir", lightning, "--lora",
                                              f"{style}:0.6", "--dtype", "fp8", "-o", fp8, "--overwrite"))[1:]
    assert commands[3][:4] == ["verify", str(fp8), "--against", str(fused)] and "--lora" not in commands[3]
    assert commands[1][:2] == ["verify", str(fused)] and f"{DEMO_SIZE}x{DEMO_SIZE}" in commands[1]
    assert DEMO_PROMPT in commands[1] and str(lightning / "sdxl_lightning_4step_lora.safetensors:1") in commands[1]
    assert commands[4] == ["inspect", str(fused)]


@pytest.mark.slow
@pytest.mark.diffusers
def test_the_demo_verify_command_runs_as_printed(demo_run: SimpleNamespace, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """What the full demo prints (conftest's session run), its verify commands run in a copy of its folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = demo_run.stdout
    assert demo_run.returncode == 0, demo_run.stderr
    commands = printed_commands(out)
    assert [c[0] for c in commands] == ["fuse", "verify", "fuse", "verify", "inspect"], out
    assert commands == printed_commands(readme_demo_block())  # the README shows exactly what the demo prints
    demo_run.copy_to(tmp_path)
    verified = _run(commands[1])
    assert "Verdict:  PASS" in verified
    verified_fp8 = _run(commands[3])
    assert "Verdict:  PASS (PSNR threshold 30 dB for fp32, fp8 scaled weights)" in verified_fp8


RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_the_repo_recipes_say_where_their_outputs_go(recipe: str) -> None:
    """A recipe in the clone, run as its comment says, writes into the user's folder, not recipes/out/."""
    text = (RECIPES / recipe).read_text()
    runs = [line for line in text.splitlines() if line.startswith("#   loratool run") and "..." not in line]
    assert runs and all("--set output_dir=" in line for line in runs), runs
    assert "give the same model" not in text


def test_the_readme_recipe_commands_write_where_they_read() -> None:
    text = README.read_text()
    for line in text.splitlines():
        if line.startswith("loratool run recipes/") and "--set base" in line:
            assert "--set output_dir=out" in line, line
