"""What users see cites public sources only: no design notes they do not have, no placeholder links."""

from __future__ import annotations

from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.presets import PRESETS


def test_presets_cite_public_sources() -> None:
    for name in PRESETS:
        run = CliRunner().invoke(cli, ["presets", name, "--json"])
        assert run.exit_code == 0, run.output
        assert "domain.md" not in run.stdout and "docs/" not in run.stdout.replace("diffusers docs", ""), name
        assert "huggingface.co/" in PRESETS[name].source, name


def test_the_model_card_links_no_placeholder() -> None:
    import inspect

    import lora_tools.publish as publish

    assert "https://github.com/)" not in inspect.getsource(publish)
