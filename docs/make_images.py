"""Make the README's picture, docs/verify-grid.png: the demo's verify comparison, rendered at 128x128.

Runs offline on the demo's synthetic models, about a minute on a CPU, from the repository root:

    python docs/make_images.py

It runs ``loratool demo --no-render`` in a temporary folder, then the verify command the demo prints, at
128x128 instead of the demo's 32x32 (small cells make a picture nobody reads), and copies the comparison
picture (title with settings and verdict, the fused model, the base with its LoRAs at run time, and their
difference) here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: The picture's cell size (the demo's model renders at any size; 128 keeps the PNG near 100 KB).
SIZE = 128


def loratool(*args: object, cwd: Path) -> None:
    """Run ``loratool ARGS`` from ``cwd`` (this checkout's code), quietly; stop on a failure."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(HERE.parent))
    subprocess.run([sys.executable, "-m", "lora_tools", *(str(a) for a in args), "-q"], cwd=cwd, env=env,
                   check=True)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        loratool("demo", "--no-render", cwd=work)
        demo = Path("demo-output")
        lightning = demo / "SDXL-Lightning" / "sdxl_lightning_4step_lora.safetensors"
        loratool("verify", demo / "community-checkpoint-lightning-4step-style-lora.safetensors",
                 "--against", demo / "community-checkpoint.safetensors", "--lora", f"{lightning}:1",
                 "--lora", f"{demo / 'style-lora.safetensors'}:0.6", "--prompt", "a lighthouse at dusk",
                 "--size", f"{SIZE}x{SIZE}", "--device", "cpu", "--dtype", "fp32", "--out", "verify", cwd=work)
        shutil.copyfile(work / "verify" / "comparison.png", HERE / "verify-grid.png")
    print(HERE / "verify-grid.png")


if __name__ == "__main__":
    main()
