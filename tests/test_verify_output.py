"""verify's output folder is all or nothing and replaces only an earlier verify output of ours.

Plan-time cases load no model (fast): the folder pointed at the user's files, ``.``, ``..``, the input's
folder and a link to it, with and without ``--overwrite``: one line, exit 1, nothing removed. The run
cases (marked slow) render one 32x32 image of the micro synthetic model: a failure while writing leaves
nothing (no folder, no temp), and ``--overwrite`` swaps an earlier output of ours in whole.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.testing import synthetic

COUNTED = "bad_input_cases"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from lora_tools.io.diffusers_folder import write_byte_tokenizer
    from lora_tools.testing.synthetic import MICRO

    root = tmp_path_factory.mktemp("verify-out")
    config = root / "config"
    for name, te in (("tokenizer", MICRO.te1), ("tokenizer_2", MICRO.te2)):
        write_byte_tokenizer(config / name, te.vocab, te.positions)
    return {"model": synthetic.write_checkpoint(root / "models" / "full.safetensors", "micro", dtype="fp32", seed=1),
            "config": config}


def _argv(model: dict[str, Path], out: Path | str, *extra: str) -> list[str]:
    return ["verify", str(model["model"]), "--preset", "lightning-4step", "--config", str(model["config"]),
            "--size", "32x32", "--prompt", "a cat", "--seeds", "0", "--device", "cpu", "--dtype", "fp32",
            "--out", str(out), *extra]


def _tree(root: Path) -> list[str]:
    return sorted(f"{p.relative_to(root)}:{p.stat().st_size if p.is_file() else 'dir'}" for p in root.rglob("*"))


def _refused(argv: list[str], watched: Path) -> str:
    before = _tree(watched)
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr and result.stdout == "", result.stderr
    assert _tree(watched) == before, "something was removed or written"
    return lines[0]


FOLDERS = {
    "users-files": lambda m, w: w / "mine",
    "dot": lambda m, w: Path("."),
    "dotdot": lambda m, w: Path(".."),
    "the-inputs-folder": lambda m, w: m["model"].parent,
    "a-link-to-the-inputs-folder": lambda m, w: w / "link",
}


@pytest.mark.bad_input_cases
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("target", list(FOLDERS))
def test_out_pointed_at_folders_not_ours_removes_nothing(target: str, overwrite: bool, model: dict[str, Path],
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    (tmp_path / "mine" / "report.json").write_text("{}")  # a report.json alone does not make it ours
    os.symlink(model["model"].parent, tmp_path / "link")
    cwd = model["model"].parent if target in ("dot", "dotdot") else tmp_path
    monkeypatch.chdir(cwd)
    out = FOLDERS[target](model, tmp_path)
    line = _refused(_argv(model, out, *(["--overwrite"] if overwrite else [])), model["model"].parent.parent)
    if target == "users-files":
        assert line == (f"Error: '{out}' already exists and is not an earlier verify output (it holds files loratool "
                        "does not write (such as 'notes.txt')): it will not be replaced; choose another output folder.")
    else:
        assert line.startswith(f"Error: Refusing to write '{out}': it "), line
        assert line.endswith(f"the input '{model['model']}'; choose another output folder."), line
    assert (tmp_path / "mine" / "notes.txt").read_text() == "the user's"


@pytest.mark.bad_input_cases
@pytest.mark.parametrize("case", ["a-file", "under-a-file", "name-too-long", "symlink-loop"])
def test_out_that_cannot_be_a_folder(case: str, model: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    os.symlink("loop", tmp_path / "loop")
    out = {"a-file": tmp_path / "file", "under-a-file": tmp_path / "file" / "out",
           "name-too-long": tmp_path / ("n" * 250), "symlink-loop": tmp_path / "loop" / "out"}[case]
    line = _refused(_argv(model, out), tmp_path)
    expected = {
        "a-file": f"Error: cannot write '{out}': it is a file (the output is a folder).",
        "under-a-file": f"Error: cannot write '{out}': '{tmp_path / 'file'}' is a file, not a folder.",
        "name-too-long": f"Error: cannot write '{out}': file name too long",
        "symlink-loop": f"Error: '{tmp_path / 'loop'}",
    }[case]
    assert line.startswith(expected), line
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.slow
@pytest.mark.diffusers
def test_a_failure_while_writing_leaves_nothing_and_overwrite_swaps_whole(
        model: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lora_tools.verify.grid as grid

    out = tmp_path / "check"
    real = grid.make_grid

    def full_disk(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device", str(args[-1]))

    monkeypatch.setattr(grid, "make_grid", full_disk)
    line = _refused(_argv(model, out, "--workflow"), tmp_path)
    assert line == f"Error: cannot write '{out}': no space left on the device."
    assert list(tmp_path.iterdir()) == []  # no folder, no temp folder
    monkeypatch.setattr(grid, "make_grid", real)
    first = CliRunner().invoke(cli, _argv(model, out, "--workflow"))
    assert first.exit_code == 0, first.output
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "images", "report.json", "report.md", "workflow.json"]
    import json

    report = json.loads((out / "report.json").read_text())
    assert all(f.startswith(str(out) + os.sep) for f in report["files"]) and report["images"][0]["file"] == str(
        out / "images" / "p0-seed0.png")
    again = CliRunner().invoke(cli, _argv(model, out))
    assert again.exit_code == 1 and "already holds a verify report" in again.stderr and "--overwrite" in again.stderr
    replaced = CliRunner().invoke(cli, _argv(model, out, "--overwrite"))
    assert replaced.exit_code == 0, replaced.output
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "images", "report.json", "report.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["check"]  # the old folder and the temp are gone
