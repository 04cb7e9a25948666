"""``python -m lora_tools``: the ``loratool`` command."""

from lora_tools.cli import main

main()
