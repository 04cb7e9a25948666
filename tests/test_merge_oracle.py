"""Peers as oracles for LoRA ops: PEFT's ``add_weighted_adapter(combination_type="cat")`` for
``merge --method concat``, and ``loratool fuse`` of the inputs one by one for converted files.

PEFT is the reference here, not our own maths: the two LoRAs are loaded into a PEFT-wrapped tiny
UNet as two adapters (their factors copied into ``lora_A``/``lora_B``, their own ranks and
alphas in the ``LoraConfig``), PEFT concatenates them with the weights, and its merged adapter's
``get_delta_weight`` is compared tensor by tensor (fp32) with our merged file's delta.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_tools.layouts import TINY
from lora_tools.layouts.targets import TargetIndex
from lora_tools.lora.load import load_lora
from lora_tools.testing.synthetic_lora import write_lora
from tests.fuse_helpers import FuseAssets, torch_threads
from tests.lora_helpers import assert_same_weights, fused, run_ok

WEIGHTS = (0.7, -0.4)
_INDEX = TargetIndex(TINY.table)


def _module_path(m) -> str:  # type: ignore[no-untyped-def]
    """The diffusers module path of a LoRA module (whatever its file's spelling)."""
    t = _INDEX.lookup(m.component, m.name)
    assert t is not None and t.part is None, m.name
    return t.diffusers_module


def _peft_adapter(pm, name: str, path: Path) -> list[str]:  # type: ignore[no-untyped-def]
    """Add the LoRA at `path` to the PEFT model as adapter `name`, its factors copied in; its module names."""
    from peft import LoraConfig

    with load_lora(path) as lora:
        mods = list(lora.modules)
        assert {m.component for m in mods} == {"unet"}
        ranks, alphas = {m.rank for m in mods}, {float(m.alpha) for m in mods}  # type: ignore[arg-type]
        assert len(ranks) == 1 and len(alphas) == 1
        config = LoraConfig(r=ranks.pop(), lora_alpha=alphas.pop(), target_modules=[_module_path(m) for m in mods],
                            init_lora_weights=False)
        if not hasattr(pm, "peft_config"):
            from peft import get_peft_model

            pm = get_peft_model(pm, config, adapter_name=name)
        else:
            pm.add_adapter(name, config)
        root = pm.base_model.model
        with torch.no_grad():
            for m in mods:
                layer = root.get_submodule(_module_path(m))
                a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
                a.copy_(m.factor("down").float().reshape(a.shape))
                b.copy_(m.factor("up").float().reshape(b.shape))
    return pm


def test_concat_merge_equals_peft_add_weighted_adapter_cat(assets: FuseAssets, tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    # different ranks, alphas, formats and target sets (the convs and feed-forwards only in one)
    a = write_lora(tmp_path / "a.safetensors", "tiny", fmt="kohya-diffusers", targets="lightning",
                   components=("unet",), rank=6, alpha=3.0, dtype="fp32", seed=41)
    b = write_lora(tmp_path / "b.safetensors", "tiny", fmt="diffusers", targets="attn", components=("unet",),
                   rank=3, alpha=5.0, dtype="fp32", seed=42)
    merged = tmp_path / "merged.safetensors"
    run_ok("merge", f"{a}:{WEIGHTS[0]}", f"{b}:{WEIGHTS[1]}", "--method", "concat", "--dtype", "fp32", "-o", merged)

    with torch_threads(1):
        unet = UNet2DConditionModel.from_pretrained(assets.folder, subfolder="unet", torch_dtype=torch.float32,
                                                    local_files_only=True)
        pm = _peft_adapter(unet, "first", a)
        pm = _peft_adapter(pm, "second", b)
        pm.add_weighted_adapter(["first", "second"], list(WEIGHTS), "merged", combination_type="cat")
        root = pm.base_model.model
        with load_lora(merged) as ours:
            assert ours.format == "kohya-diffusers"
            names = {_module_path(m) for m in ours.modules}
            with load_lora(a) as la, load_lora(b) as lb:
                in_a, in_b = {_module_path(m) for m in la.modules}, {_module_path(m) for m in lb.modules}
            assert names == in_a | in_b and in_a - in_b and in_a & in_b  # shared modules and modules of one only
            compared = 0
            for m in ours.modules:
                layer = root.get_submodule(_module_path(m))
                with torch.no_grad():
                    ref = layer.get_delta_weight("merged").float()
                got = m.delta(tuple(ref.shape)).float()
                assert ref.abs().max() > 0, m.name
                err = float((got - ref).abs().max() / ref.abs().max())
                assert err <= 1e-6, f"{m.name}: {err:.3g}"
                compared += 1
    assert compared == len(names)


@pytest.mark.slow
@pytest.mark.parametrize("src,to", [("style", "kohya"), ("style", "diffusers"), ("lightning_lora", "peft"),
                                    ("style", "comfy")])
def test_converted_file_fuses_like_the_input(assets: FuseAssets, tmp_path: Path, src: str, to: str) -> None:
    """``loratool fuse`` of a converted file gives the weights fusing the original gives (a raw peft
    file holds one model, so the UNet-only LoRA goes there)."""
    original = getattr(assets, src)
    out = tmp_path / f"{src}-{to}.safetensors"
    run_ok("convert", original, "--to", to, "-o", out)
    ours = fused(assets.base, tmp_path / "a.safetensors", f"{out}:0.6")
    ref = fused(assets.base, tmp_path / "b.safetensors", f"{original}:0.6")
    changed = [k for k in ref if not torch.equal(ref[k], load_base(assets)[k])]
    assert changed
    assert_same_weights(ours, ref, rtol=0)


_BASE: dict[Path, dict[str, torch.Tensor]] = {}


def load_base(assets: FuseAssets) -> dict[str, torch.Tensor]:
    from lora_tools.io.safetensors import load_tensors

    if assets.base not in _BASE:
        _BASE[assets.base] = load_tensors(assets.base)
    return _BASE[assets.base]
