"""Fuse the 4-step Lightning LoRA (from a local folder) into a checkpoint with the library API.

Run: python examples/fuse_lightning.py   (builds a tiny synthetic checkpoint and LoRA first)
With real files: lora_tools.fuse("juggernaut.safetensors", "lightning-4step") takes the LoRA from the hub.
"""

import tempfile
from pathlib import Path

import lora_tools
from lora_tools.testing import synthetic
from lora_tools.testing.synthetic_lora import write_lightning_lora

work = Path(tempfile.mkdtemp())
base = synthetic.write_checkpoint(work / "my-checkpoint.safetensors", "tiny")
write_lightning_lora(work / "lightning" / "sdxl_lightning_4step_lora.safetensors", "tiny")

result = lora_tools.fuse(base, "lightning-4step", preset_dir=work / "lightning", saves=("checkpoint", "unet"))
for f in result.files:
    print(f"{f.kind}: {f.path.name} ({f.nbytes} bytes)")
print("sampler:", result.record["sampler"])
