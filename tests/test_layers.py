"""The layer contract of ``pyproject.toml`` ([tool.importlinter], what ``lint-imports`` checks in CI) holds:
each layer imports only from the layers below it, and no folder's modules import each other in a circle.
Imports written inside functions count (import-linter reads them too), so a plain test run catches a
deferred import that runs back up or closes a circle."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_LINT = ("import sys\nfrom importlinter.cli import lint_imports\n"
         "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _LINT], cwd=root, capture_output=True, text=True, check=False,
                          env=dict(os.environ, PYTHONPATH=str(root)), timeout=300)


@pytest.mark.subprocess
@pytest.mark.smoke  # the contract itself runs in the default selection too
def test_the_package_keeps_its_layer_contract() -> None:
    p = _lint(ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in p.stdout


def _copy(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "lora_tools", tmp_path / "lora_tools", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


@pytest.mark.subprocess
def test_an_upward_import_inside_a_function_breaks_the_contract(tmp_path: Path) -> None:
    """What the review found: ``output/plan.py`` importing the CLI's byte formatter inside a function."""
    root = _copy(tmp_path)
    with open(root / "lora_tools" / "output" / "plan.py", "a") as f:
        f.write("\n\ndef _shown(n: int) -> str:\n"
                "    from lora_tools.cli._output import safe_text\n\n"
                "    return safe_text(n)\n")
    p = _lint(root)
    assert p.returncode == 1, p.stdout[-3000:]
    assert "lora_tools.output is not allowed to import lora_tools.cli" in p.stdout, p.stdout[-3000:]


@pytest.mark.subprocess
def test_a_circle_inside_one_folder_breaks_the_contract(tmp_path: Path) -> None:
    """What the review found: ``ops/analyze.py`` and ``ops/baked.py`` importing each other."""
    root = _copy(tmp_path)
    with open(root / "lora_tools" / "ops" / "analyze.py", "a") as f:
        f.write("\n\ndef _baked() -> object:\n    from lora_tools.ops import baked\n\n    return baked\n")
    p = _lint(root)
    assert p.returncode == 1, p.stdout[-3000:]
    assert "No cycles are allowed in lora_tools.ops." in p.stdout, p.stdout[-3000:]
