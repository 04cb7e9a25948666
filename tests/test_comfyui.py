"""ComfyUI's own code as the oracle: what we write loads in ComfyUI, and what ComfyUI reads we read alike.

Runs ComfyUI from a checkout (``LORA_TOOLS_COMFYUI=/path/to/ComfyUI``, see tests/comfyui_helpers.py) and is
skipped, with the reason, where ComfyUI is not importable (CI). Full selection only (``slow``):

    LORA_TOOLS_COMFYUI=/path/to/ComfyUI python -m pytest -m "" tests/test_comfyui.py

* LoRA key map parity (issue #24): every format we write, every algorithm it can hold, and the other
  namings and factor spellings ComfyUI reads for SDXL, applied by ComfyUI (``model_lora_keys_unet``/
  ``_clip``, ``load_lora``, ``calculate_weight``) and by our fuse to the same micro SDXL-topology model:
  the same patched tensors, tensor for tensor, and no key ComfyUI leaves unloaded.
* fp8 single files (issue #21): ComfyUI's checkpoint loader builds its SDXL model from our scaled and
  plain fp8 fuses, recognises the scaled form, and the weights it computes with equal ours.
* The API-format workflow ``fuse --workflow`` writes passes ComfyUI's own prompt validation (issue #24).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.io.fp8 import dequantize_state
from lora_tools.io.safetensors import load_tensors, save_tensors
from lora_tools.testing.synthetic import write_checkpoint
from lora_tools.testing.synthetic_lora import make_lora
from tests.comfyui_helpers import SGM_UNET, comfy_apply_lora, comfy_state, comfyui, registered_tiny_sdxl

pytestmark = pytest.mark.slow

COMPONENTS = ("unet", "te1", "te2")
#: Worst |ours - ComfyUI| / max |weight| allowed on an fp32 patched tensor (summation order only).
REL_TOL = 2e-6


@pytest.fixture(scope="module")
def comfy() -> SimpleNamespace:
    return comfyui()


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("comfy-micro")
    base = write_checkpoint(d / "base.safetensors", "micro", dtype="fp32", seed=3)
    return SimpleNamespace(dir=d, base=base, state=load_tensors(base))


def _fuse(base: Path, lora: Path, out: Path, strength: float) -> dict[str, torch.Tensor]:
    r = CliRunner().invoke(cli, ["fuse", str(base), "--lora", f"{lora}:{strength}", "-o", str(out), "--dtype", "fp32",
                                 "-q", "--overwrite"])
    assert r.exit_code == 0, r.output
    return load_tensors(out)


def assert_same_as_comfyui(comfy: SimpleNamespace, micro: SimpleNamespace, lora_sd: dict[str, torch.Tensor],
                           metadata: dict[str, str], name: str, strength: float = 1.0) -> int:
    """Fuse ``lora_sd`` with ours and apply it with ComfyUI's code; same weights, nothing left unloaded.
    Returns how many tensors ComfyUI patched."""
    path = micro.dir / f"{name}.safetensors"
    save_tensors(path, lora_sd, metadata)
    theirs, unloaded = comfy_apply_lora(comfy, micro.state, lora_sd, strength)
    assert unloaded == [], f"ComfyUI left {len(unloaded)} keys of {name} unloaded, e.g. {unloaded[:3]}"
    ours = comfy_state(comfy, _fuse(micro.base, path, micro.dir / f"{name}-fused.safetensors", strength))
    base = comfy_state(comfy, micro.state)
    changed = {k for k in base if not torch.equal(ours[k], base[k])}
    assert changed == set(theirs), (f"{name}: we change {len(changed)} tensors, ComfyUI {len(theirs)}; only ours: "
                                    f"{sorted(changed - set(theirs))[:3]}, only ComfyUI's: {sorted(set(theirs) - changed)[:3]}")
    for k, want in theirs.items():
        got = ours[k].to(torch.float32)
        err = float((got - want).abs().max()) / max(float(want.abs().max()), 1e-12)
        assert err <= REL_TOL, f"{name}: {k} differs from ComfyUI's by {err:.2e} (relative to its largest value)"
    return len(theirs)


# ----------------------------------------------------------------------------------------- every format we write

#: The formats ComfyUI reads completely, and the algorithms our writer can put in each.
COMPLETE = [(f, a) for f in ("kohya", "kohya-diffusers", "comfy", "diffusers-legacy")
            for a in ("lora", "lora-tucker", "loha", "lokr", "dora")
            if not (f == "diffusers-legacy" and a in ("loha", "lokr"))]


def _dora_per_input(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DoRA magnitudes along the input axis (``(1, in[, 1, 1])``, LyCORIS without ``wd_on_out``): the
    case where ComfyUI normalises the combined weight, as DoRA defines (see the per-output test below)."""
    out = dict(tensors)
    g = torch.Generator().manual_seed(5)
    for k, v in tensors.items():
        if k.endswith("dora_scale"):
            stem = k[: -len(".dora_scale")]  # processor spelling: <attn>.processor.to_q_lora.down.weight
            down = next(t for n, t in tensors.items()
                        if n.startswith(stem) and n[len(stem)] in "._" and n.endswith(("down.weight", "lora_A.weight")))
            shape = (1, down.shape[1], *([1] * (down.dim() - 2)))
            out[k] = torch.rand(shape, generator=g) + 0.5
    return out


@pytest.mark.parametrize(("fmt", "algorithm"), COMPLETE, ids=[f"{f}-{a}" for f, a in COMPLETE])
def test_every_format_comfyui_reads_loads_completely_and_equally(
        comfy: SimpleNamespace, micro: SimpleNamespace, fmt: str, algorithm: str) -> None:
    tensors, metadata = make_lora("micro", fmt=fmt, algorithm=algorithm, targets="all",  # type: ignore[arg-type]
                                  components=COMPONENTS, rank=4, alpha=2.0, seed=21)
    if algorithm == "dora":
        tensors = _dora_per_input(tensors)
    n = assert_same_as_comfyui(comfy, micro, tensors, metadata, f"{fmt}-{algorithm}", strength=0.7)
    assert n >= 100
