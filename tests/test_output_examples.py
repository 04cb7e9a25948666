"""``examples/*.py`` leave no temporary folders behind (each run gets its own empty TMPDIR)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest


@pytest.mark.parametrize("name", ["inspect_lora.py", "fuse_lightning.py",
                                  pytest.param("fuse_several_loras.py", marks=pytest.mark.slow)])
def test_example_leaves_no_temporary_folder(example_run: Callable[[str], SimpleNamespace], name: str) -> None:
    proc = example_run(name)  # its own empty TMPDIR, run once per session (test_examples reads the same run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()
    assert proc.left == []


def test_demo_never_clears_a_folder_it_did_not_make(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from lora_tools.cli import cli

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(theirs)
    from lora_tools.cli.demo import DEMO_MARKER

    (theirs / DEMO_MARKER).write_text("a marker the user copied")  # even with a marker inside
    r = CliRunner().invoke(cli, ["demo", "--dir", str(link), "--no-render"])
    assert r.exit_code == 1 and r.stderr == f"Error: '{link}' is a symbolic link: pass a real folder as --dir.\n", r.stderr
    assert sorted(p.name for p in theirs.iterdir()) == sorted([DEMO_MARKER, "keep.txt"])
