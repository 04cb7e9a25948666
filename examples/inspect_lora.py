"""Inspect a LoRA with the library API: format, modules, ranks, alphas, what it is.

Run: python examples/inspect_lora.py [PATH]   (without PATH it builds a Lightning-shaped LoRA)
"""

import json
import sys
import tempfile
from pathlib import Path

import lora_tools
from lora_tools.testing.synthetic_lora import write_lightning_lora

if len(sys.argv) > 1:
    path = Path(sys.argv[1])
else:
    _tmp = tempfile.TemporaryDirectory(prefix="loratool-example-")  # removed when the script ends
    path = write_lightning_lora(Path(_tmp.name) / "sdxl_lightning_4step_lora.safetensors", "tiny")

report = lora_tools.inspect_path(path).to_dict()
lora = report["lora"]
print(json.dumps({"kind": report["kind"], "format": lora["format"], "modules": lora["modules"],
                  "ranks": lora["ranks"], "alphas": lora["alphas"], "acceleration": lora["acceleration"]["label"]}, indent=2))
