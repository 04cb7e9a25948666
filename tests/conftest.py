"""Shared fixtures: tiny SDXL-topology models built once per session (never downloaded)."""

from __future__ import annotations

import os

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
