"""Key grammar as two independent parts: every naming family crossed with every factor spelling parses,
and gives the delta written from the formula; PEFT metadata layouts give PEFT's alphas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_tools.errors import UnknownFormatError
from lora_tools.io.safetensors import save_tensors
from lora_tools.layouts import TINY
from lora_tools.layouts.targets import TargetIndex
from lora_tools.lora.adapter import LoraModule
from lora_tools.lora.formats import get_format
from lora_tools.lora.load import detect_format, load_lora
from lora_tools.lora.save import spell_module, spelled_tensors
from lora_tools.lora.spelling import PROCESSOR, SPELLINGS, spell_key
from lora_tools.testing.synthetic_lora import select_targets

NAMINGS = ["kohya", "kohya-diffusers", "diffusers", "peft", "comfy"]
SPELL = [*SPELLINGS, PROCESSOR]


def _targets(naming: str) -> list:
    unet = [t for t in select_targets(TINY, "attn") if t.diffusers_module.endswith((".to_q", ".to_out.0"))][:2]
    if naming == "peft":
        return unet
    return unet + select_targets(TINY, "attn", ("te1",))[:1] + select_targets(TINY, "attn", ("te2",))[:1]


def _spelled(naming: str, spelling: str, target) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    probe = LoraModule(target.component, target.diffusers_module, "lora", {}, None, 0, None,  # type: ignore[arg-type]
                       naming="diffusers", spelling="peft", envelope=None)
    envelope, name, _ = spell_module(probe, get_format(naming))
    return envelope, name


@pytest.mark.parametrize("spelling", SPELL)
@pytest.mark.parametrize("naming", NAMINGS)
def test_every_naming_reads_every_spelling(tmp_path: Path, naming: str, spelling: str) -> None:
    if spelling == PROCESSOR and naming != "diffusers":
        pytest.skip("the attention-processor spelling exists under diffusers names only")
    if spelling == "legacy-underscore" and get_format(naming).naming.underscored:
        pytest.skip("kohya names hold no '.', so '<name>_lora.up' would be a different module name")
    g = torch.Generator().manual_seed(3)
    tensors, refs = {}, {}
    for t in _targets(naming):
        if spelling == PROCESSOR and t.component != "unet":
            continue
        envelope, name = _spelled(naming, spelling, t)
        up = torch.randn(t.shape[0], 4, generator=g)
        down = torch.randn(4, t.shape[1], generator=g)
        alpha = 2.0
        tensors[spell_key(envelope, name, "up", spelling)] = up
        tensors[spell_key(envelope, name, "down", spelling)] = down
        tensors[spell_key(envelope, name, "alpha", spelling)] = torch.tensor(alpha)
        refs[(t.component, name)] = (up.double() @ down.double()) * (alpha / 4), t.shape
    path = save_tensors(tmp_path / "x.safetensors", tensors)  # type: ignore[arg-type]
    with load_lora(path) as lora:
        family = "diffusers-legacy" if naming == "diffusers" and spelling.startswith("legacy") else naming
        assert lora.format == family
        assert lora.spelling == spelling
        assert {(m.component, m.name) for m in lora.modules} == set(refs)
        for m in lora.modules:
            ref, shape = refs[(m.component, m.name)]
            assert m.scale == 0.5
            assert torch.allclose(m.delta(shape).double(), ref, rtol=1e-6, atol=1e-6), m.name


def test_legacy_processor_keys_with_alpha(tmp_path: Path) -> None:
    """issue 10.3: ``...attn1.processor.to_k_lora.alpha`` and ``..._lora.alpha`` belong to their module."""
    t = [t for t in select_targets(TINY, "attn") if t.diffusers_module.endswith(".to_k")][0]
    stem = t.diffusers_module[: -len(".to_k")]
    up, down = torch.ones(t.shape[0], 2), torch.ones(2, t.shape[1])
    tensors = {f"unet.{stem}.processor.to_k_lora.up.weight": up, f"unet.{stem}.processor.to_k_lora.down.weight": down,
               f"unet.{stem}.processor.to_k_lora.alpha": torch.tensor(1.0)}
    with load_lora(save_tensors(tmp_path / "p.safetensors", tensors)) as lora:
        (m,) = lora.modules
        assert (lora.format, m.name, m.alpha, m.scale) == ("diffusers-legacy", t.diffusers_module, 1.0, 0.5)
    # ComfyUI reads the alpha as "<its module name>.alpha" only: we read that too, and write it
    tensors = {f"unet.{stem}.processor.to_k_lora.up.weight": up, f"unet.{stem}.processor.to_k_lora.down.weight": down,
               f"unet.{stem}.processor.to_k.alpha": torch.tensor(1.0)}
    with load_lora(save_tensors(tmp_path / "c.safetensors", tensors)) as lora:
        (m,) = lora.modules
        assert (lora.format, m.name, m.alpha, m.scale) == ("diffusers-legacy", t.diffusers_module, 1.0, 0.5)
        assert spelled_tensors(lora, format="diffusers-legacy")[0].keys() == tensors.keys()
    tensors = {f"unet.{stem}.to_k_lora.up.weight": up, f"unet.{stem}.to_k_lora.down.weight": down,
               f"unet.{stem}.to_k_lora.alpha": torch.tensor(1.0)}
    with load_lora(save_tensors(tmp_path / "u.safetensors", tensors)) as lora:
        (m,) = lora.modules
        assert (m.name, m.alpha) == (t.diffusers_module, 1.0)


def _peft_file(tmp_path: Path, meta: dict, name: str = "m.safetensors", prefix: str = "unet.") -> Path:
    targets = [t for t in select_targets(TINY, "attn")][:3]
    tensors = {}
    for t in targets:
        tensors[f"{prefix}{t.diffusers_module}.lora_A.weight"] = torch.ones(4, t.shape[1])
        tensors[f"{prefix}{t.diffusers_module}.lora_B.weight"] = torch.ones(t.shape[0], 4)
    return save_tensors(tmp_path / name, tensors, {"lora_adapter_metadata": json.dumps(meta)})


@pytest.mark.parametrize("layout", ["flat", "per-component", "pattern", "rslora"])
def test_peft_metadata_layouts_give_peft_scales(tmp_path: Path, layout: str) -> None:
    """issue 10.5: the scale each module gets is PEFT's own ``LoraLayer.scaling``."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = [t for t in select_targets(TINY, "attn")][:3]
    first = targets[0].diffusers_module
    cfg: dict = {"r": 4, "lora_alpha": 8}
    if layout == "pattern":
        cfg["alpha_pattern"] = {first: 2}
    if layout == "rslora":
        cfg["use_rslora"] = True
    meta = {f"unet.{k}": v for k, v in cfg.items()} if layout == "per-component" else cfg
    path = _peft_file(tmp_path, meta, prefix="base_model.model." if layout == "flat" else "unet.")
    with load_lora(path) as lora:
        scales = {m.name: m.scale for m in lora.modules}
    # PEFT's own scaling: a model holding the same module paths, adapted by LoraConfig(**cfg)
    model = torch.nn.Module()
    for t in targets:
        parent = model
        *path_parts, leaf = t.diffusers_module.split(".")
        for part in path_parts:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, torch.nn.Linear(t.shape[1], t.shape[0]))
    inject_adapter_in_model(LoraConfig(target_modules=[t.diffusers_module for t in targets], **cfg), model)
    assert set(scales) == {t.diffusers_module for t in targets}
    for name, scale in scales.items():
        assert scale == pytest.approx(model.get_submodule(name).scaling["default"], rel=1e-12), (layout, name)


def test_not_a_lora_keeps_the_closest_format_message(tmp_path: Path) -> None:
    keys = ["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight", "lora_unet_x.weird"]
    with pytest.raises(UnknownFormatError, match="looks like a kohya-diffusers LoRA but 1 keys do not fit"):
        detect_format(keys)
    with pytest.raises(UnknownFormatError, match="full checkpoint"):
        detect_format(["model.diffusion_model.input_blocks.0.0.weight"])


@pytest.mark.parametrize("layer", ["linear-square", "linear", "conv3x3-square", "conv3x3"])
def test_dora_matches_peft_dora_layer(layer: str) -> None:
    """issue 10.4: the magnitude axis comes from the format (PEFT: per output), square weights included."""
    from peft import LoraConfig, inject_adapter_in_model

    from lora_tools.lora.adapter import LoraAdapter
    from lora_tools.lora.delta import dora_apply

    torch.manual_seed(0)
    out_ch, in_ch = (8, 8) if layer.endswith("square") else (8, 6)
    model = torch.nn.Module()
    model.add_module("m", torch.nn.Linear(in_ch, out_ch) if layer.startswith("linear")
                     else torch.nn.Conv2d(in_ch, out_ch, 3, padding=1))
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["m"], use_dora=True,
                                       init_lora_weights=False), model)
    peft_layer = model.m
    base = peft_layer.base_layer.weight.detach().clone()
    down = peft_layer.lora_A["default"].weight.detach().clone()
    up = peft_layer.lora_B["default"].weight.detach().clone()
    with torch.no_grad():
        mag = peft_layer.lora_magnitude_vector["default"].weight
        mag.mul_(torch.linspace(0.5, 1.5, mag.numel()).reshape(mag.shape))
    magnitude = mag.detach().clone()
    peft_layer.merge()
    want = peft_layer.base_layer.weight.detach()

    lora = LoraAdapter.from_tensors({("unet", "m"): {"down": down, "up": up, "dora_scale": magnitude}},
                                    alphas={("unet", "m"): 4.0}, format="diffusers")
    (m,) = lora.modules
    assert m.dora_axis == "out"
    got = dora_apply(base, m.delta(tuple(base.shape)), m.factor("dora_scale").reshape(-1), axis=m.dora_axis)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_lycoris_input_axis_dora_on_a_square_conv() -> None:
    """kohya/LyCORIS ``wd_on_out=False``: ``dora_scale`` (1, in, 1, 1), norm per input column."""
    from lora_tools.lora.adapter import LoraAdapter
    from lora_tools.lora.delta import dora_apply

    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 8, 3, 3, generator=g, dtype=torch.float64)
    up, down = torch.randn(8, 2, 1, 1, generator=g), torch.randn(2, 8, 3, 3, generator=g)
    scale = torch.rand(1, 8, 1, 1, generator=g) + 0.5
    lora = LoraAdapter.from_tensors({("unet", "c"): {"down": down, "up": up, "dora_scale": scale}}, format="kohya")
    (m,) = lora.modules
    assert m.dora_axis == "in"
    combined = w + (up.double().flatten(1) @ down.double().flatten(1)).reshape(w.shape)
    norm = torch.linalg.vector_norm(combined, dim=(0, 2, 3), keepdim=True)
    ref = combined * scale.double() / norm
    got = dora_apply(w.float(), m.delta(tuple(w.shape)), m.factor("dora_scale"), axis=m.dora_axis)
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_tensors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The tensors of a tiny fp32 single file (UNet and both text encoders)."""
    from lora_tools.io.safetensors import load_tensors
    from lora_tools.testing.synthetic import write_checkpoint

    path = write_checkpoint(tmp_path_factory.mktemp("cross") / "base.safetensors", "tiny", dtype="fp32",
                            components=("unet", "te1", "te2"))
    return load_tensors(path)


_TE2 = "conditioner.embedders.1.model."


def _cross_targets(naming: str, spelling: str) -> list:
    """UNet to_q/to_out.0 and CLIP-L q_proj (as above), bigG's q/k/v of layer 1 (row slices of one fused
    in_proj_weight) and bigG's text_projection (stored transposed)."""
    index = TargetIndex(TINY.table)
    out = _targets(naming)[:3] if naming != "peft" else _targets(naming)
    if naming == "peft" or spelling == PROCESSOR:
        return [t for t in out if t.component == "unet"]
    for proj in ("q_proj", "k_proj", "v_proj"):
        out.append(index.lookup("te2", f"text_model.encoder.layers.1.self_attn.{proj}"))
    out.append(index.lookup("te2", "text_projection"))
    return out


def _reference_key(t) -> tuple[str, slice | None, bool]:  # type: ignore[no-untyped-def]
    """Where a target's delta goes in the single file, written from OpenCLIP's layout:
    q/k/v are rows 0/1/2 x width of in_proj_weight, text_projection is x @ P (transposed)."""
    name = t.diffusers_module
    if t.component == "te2" and name == "text_projection":
        return _TE2 + "text_projection", None, True
    if t.component == "te2" and ".self_attn." in name and name.endswith(("q_proj", "k_proj", "v_proj")):
        layer = name.split(".")[3]
        i = ("q_proj", "k_proj", "v_proj").index(name.rsplit(".", 1)[1])
        h = t.shape[0]
        return f"{_TE2}transformer.resblocks.{layer}.attn.in_proj_weight", slice(i * h, (i + 1) * h), False
    return t.sgm_key, None, False


@pytest.mark.parametrize("spelling", SPELL)
@pytest.mark.parametrize("naming", NAMINGS)
def test_every_naming_and_spelling_fuses_like_the_dense_reference(tiny_tensors: dict[str, torch.Tensor],
                                                                  tmp_path: Path, naming: str, spelling: str) -> None:
    """The fuse's own path (match_lora -> the engine's contributions -> patch_tensor) on the tiny base:
    every changed single-file tensor equals W + strength * alpha/rank * up @ down in fp64, on the
    right rows (bigG q/k/v) and in the right orientation (text_projection)."""
    from lora_tools.engine.contributions import module_contribution
    from lora_tools.engine.patch import patch_tensor
    from lora_tools.lora.match import match_lora

    if spelling == PROCESSOR and naming != "diffusers":
        pytest.skip("the attention-processor spelling exists under diffusers names only")
    if spelling == "legacy-underscore" and get_format(naming).naming.underscored:
        pytest.skip("kohya names hold no '.', so '<name>_lora.up' would be a different module name")
    g = torch.Generator().manual_seed(11)
    tensors: dict[str, torch.Tensor] = {}
    want: dict[str, torch.Tensor] = {}
    strength = 0.75
    for t in _cross_targets(naming, spelling):
        envelope, name = _spelled(naming, spelling, t)
        up, down = torch.randn(t.shape[0], 2, generator=g), torch.randn(2, t.shape[1], generator=g)
        tensors[spell_key(envelope, name, "up", spelling)] = up
        tensors[spell_key(envelope, name, "down", spelling)] = down
        tensors[spell_key(envelope, name, "alpha", spelling)] = torch.tensor(1.0)
        key, rows, transposed = _reference_key(t)
        delta = strength * 0.5 * (up.double() @ down.double())
        ref = want.setdefault(key, tiny_tensors[key].double().clone())
        view = ref if rows is None else ref[rows]
        view += delta.T if transposed else delta.reshape(view.shape)
    path = save_tensors(tmp_path / "x.safetensors", tensors)  # type: ignore[arg-type]
    with load_lora(path) as lora:
        m = match_lora(lora, TargetIndex(TINY.table))
        assert not m.unmatched
        per_key: dict[str, list] = {}
        for mm in m.matched:
            for key in mm.keys:
                rows = None
                if mm.target.part is not None:
                    i, n = mm.target.part
                    c = tiny_tensors[key].shape[0] // n
                    rows = slice(i * c, (i + 1) * c)
                per_key.setdefault(key, []).append(module_contribution(lora, mm, key, strength, rows))
        assert sorted(per_key) == sorted(want)
        for key, contribs in per_key.items():
            fused, n = patch_tensor(key, contribs, tiny_tensors[key].clone(), torch.float32)
            assert n == len(contribs)
            assert torch.allclose(fused.double(), want[key], rtol=0, atol=1e-5), key
