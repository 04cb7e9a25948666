"""Shared fixtures: tiny SDXL-topology models built once per session (never downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from lora_tools.testing import synthetic

    return synthetic.write_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-sdxl.safetensors", "tiny", dtype="fp32")


@pytest.fixture(scope="session")
def tiny_diffusers_folder(tmp_path_factory):
    from lora_tools.testing import synthetic

    return synthetic.write_diffusers_folder(tmp_path_factory.mktemp("tiny-diffusers") / "tiny-sdxl", "tiny", dtype="fp32")


def pytest_configure(config):
    config.addinivalue_line("markers", "bad_input_cases: a case of the bad-input matrix (counted in the summary)")


_BAD_INPUT_OUTCOMES: dict[str, int] = {}


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.skipped):
        if "bad_input_cases" in report.keywords:
            outcome = "xfailed" if hasattr(report, "wasxfail") else report.outcome
            _BAD_INPUT_OUTCOMES[outcome] = _BAD_INPUT_OUTCOMES.get(outcome, 0) + 1


def pytest_terminal_summary(terminalreporter):
    if _BAD_INPUT_OUTCOMES:
        total = sum(_BAD_INPUT_OUTCOMES.values())
        parts = ", ".join(f"{n} {k}" for k, n in sorted(_BAD_INPUT_OUTCOMES.items()))
        terminalreporter.write_line(f"bad-input matrix: {total} cases ({parts})")


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache with the hub offline: tests fill it, nothing is downloaded."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for var in ("HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return cache
