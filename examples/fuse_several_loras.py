"""Merge several LoRAs into a checkpoint in one streaming pass, each with its own strength,
then check the result against diffusers' own runtime fusion.

Run: python examples/fuse_several_loras.py
"""

import tempfile
from pathlib import Path

import lora_tools
from lora_tools.testing import synthetic
from lora_tools.testing.synthetic_lora import write_lora

work = Path(tempfile.mkdtemp())
base = synthetic.write_checkpoint(work / "base.safetensors", "tiny", dtype="fp32")
style = write_lora(work / "style.safetensors", "tiny", fmt="kohya-sgm", components=("unet", "te1", "te2"), alpha=2.0)
detail = write_lora(work / "detail.safetensors", "tiny", fmt="diffusers", targets="all", alpha=4.0, seed=3)

out = work / "base-style-detail.safetensors"
lora_tools.fuse(base, loras=[(str(style), 0.8), (str(detail), 0.5)], output=out)
check = lora_tools.compare_with_runtime_lora(base, out, [(style, 0.8), (detail, 0.5)])
print(f"{check.tensors_changed} tensors changed; max relative difference to diffusers {check.max_rel_diff:.1e}: "
      f"{'OK' if check.ok else 'MISMATCH'}")
