"""Fused weights against independent references.

* diffusers is the oracle for every LoRA format it reads: ``load_lora_weights`` + ``set_adapters`` +
  ``fuse_lora`` on the same tiny model (a diffusers folder built with the same seed as the base).
* diffusers' own single-file loader (``from_single_file``) reads our fused file, so our SGM <->
  diffusers tables are checked by code that is not ours.
* Formats diffusers cannot read (ComfyUI, raw PEFT, LyCORIS LoCon-Tucker / LoHa / LoKr, DoRA) are
  checked against the kohya result or a dense reference written here from the published formulas (LyCORIS, the DoRA paper).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_tools.io.safetensors import TensorFile, load_tensors
from lora_tools.layouts import TINY
from lora_tools.layouts.targets import ModuleTarget
from lora_tools.ops.fuse import fuse
from lora_tools.testing.synthetic_lora import module_keys, select_targets, write_lora
from tests.fuse_helpers import REL_TOL, FuseAssets, compare, diffusers_fuse, n_targets, target_keys, to_diffusers

COMPONENTS = ("unet", "te1", "te2")

# id -> write_lora arguments. Text encoders everywhere: every one of these formats can carry them.
DIFFUSERS_FORMATS = {
    # Lightning-shaped: kohya envelope, diffusers names, LCM target list (3x3 convs included), fp16
    "kohya-diffusers-lightning": dict(fmt="kohya-diffusers", targets="lightning", rank=4, alpha=2.0, dtype="fp16", seed=11),
    "kohya-sgm": dict(fmt="kohya-sgm", targets="attn", rank=4, alpha=1.0, seed=12),
    # alpha only in the lora_adapter_metadata header (scale 8/4 = 2: ignoring it would show)
    "diffusers": dict(fmt="diffusers", targets="attn", rank=4, alpha=8.0, seed=13),
    "diffusers-legacy": dict(fmt="diffusers-legacy", targets="attn", rank=4, alpha=None, seed=14),
}


def test_lightning_targets_include_3x3_convs() -> None:
    """The Lightning-shaped case really exercises conv LoRAs (else the oracle test proves less)."""
    shapes = [t.shape for t in select_targets(TINY, "lightning")]
    assert sum(1 for s in shapes if len(s) == 4 and s[2:] == (3, 3)) > 10
    assert sum(1 for s in shapes if len(s) == 2) > 100


@pytest.mark.diffusers
@pytest.mark.parametrize("case", list(DIFFUSERS_FORMATS))  # the default's oracle: test_layouts' conversion check
def test_fuse_equals_diffusers_fuse_lora(assets: FuseAssets, tmp_path: Path, case: str) -> None:
    kwargs = dict(DIFFUSERS_FORMATS[case])
    lora = write_lora(tmp_path / f"{case}.safetensors", "tiny", components=COMPONENTS, **kwargs)
    strengths = (1.0, 0.6)
    oracles = diffusers_fuse(assets.folder, [(lora, 1.0)], scales=strengths)
    expected = {c: n_targets(str(kwargs["targets"]), (c,)) for c in COMPONENTS}
    assert all(n > 0 for n in expected.values())

    for strength, oracle in zip(strengths, oracles, strict=True):
        out = tmp_path / f"fused-{strength}.safetensors"
        result = fuse(assets.base, loras=[(str(lora), strength)], output=out)
        assert result.modules_fused == sum(expected.values())
        ours = to_diffusers(out)
        for comp in COMPONENTS:
            changed_oracle, changed_ours, worst, key = compare(ours[comp], oracle[comp], assets.base_sd[comp],
                                                               f"{case}@{strength} {comp}")
            assert changed_oracle == expected[comp], (comp, changed_oracle)
            assert changed_ours == expected[comp], (comp, changed_ours)
            assert worst <= REL_TOL, f"{case} at {strength}: {comp}.{key} differs by {worst:.3g} (relative)"
        # untouched component: the VAE is the base's, bit for bit
        assert all(torch.equal(ours["vae"][k], v) for k, v in assets.base_sd["vae"].items())


# ---------------------------------------------------------------------------- several LoRAs at once


@pytest.fixture(scope="module")
def lightning_style_fused(assets: FuseAssets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """--lightning 4 (from --lightning-dir) + the kohya-SGM style LoRA at 0.6, fp32, one single file."""
    out = tmp_path_factory.mktemp("multi") / "lightning-style.safetensors"
    fuse(assets.base, lightning=4, lightning_dir=assets.lightning_dir, loras=[(str(assets.style), 0.6)], output=out)
    return out


@pytest.mark.diffusers
def test_several_loras_equal_diffusers_set_adapters(assets: FuseAssets, lightning_style_fused: Path) -> None:
    oracle = assets.oracle_lightning_style
    ours = to_diffusers(lightning_style_fused)
    # the attention targets of the style LoRA are a subset of the Lightning (LCM) targets
    expected = {"unet": n_targets("lightning"), "te1": n_targets("attn", ("te1",)), "te2": n_targets("attn", ("te2",))}
    assert target_keys("attn") < target_keys("lightning")
    for comp in COMPONENTS:
        changed_oracle, changed_ours, worst, key = compare(ours[comp], oracle[comp], assets.base_sd[comp], comp)
        assert changed_oracle == changed_ours == expected[comp]
        assert worst <= REL_TOL, f"{comp}.{key}: {worst:.3g}"


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


@pytest.mark.diffusers
def test_diffusers_single_file_unet_loads_our_file(assets: FuseAssets, lightning_style_fused: Path) -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_single_file(str(lightning_style_fused), config=str(assets.folder), subfolder="unet",
                                                 local_files_only=True, torch_dtype=torch.float32)
    oracle = assets.oracle_lightning_style["unet"]
    sd = unet.state_dict()
    assert set(sd) == set(oracle)
    worst = max(_max_rel(sd[k], v) for k, v in oracle.items())
    assert worst <= REL_TOL
    changed = sum(not torch.equal(sd[k], assets.base_sd["unet"][k]) for k in sd)
    assert changed == n_targets("lightning")


@pytest.mark.diffusers
def test_diffusers_single_file_pipeline_loads_our_file(assets: FuseAssets, lightning_style_fused: Path) -> None:
    """unet, vae and CLIP-L through StableDiffusionXLPipeline.from_single_file; OpenCLIP-bigG through
    diffusers' converter (its single-file *loader* leaves layers >= 12 of this tiny 32-layer bigG on
    the meta device, a diffusers/transformers 5 limitation unrelated to our file)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    pipe = StableDiffusionXLPipeline.from_single_file(str(lightning_style_fused), config=str(assets.folder),
                                                      local_files_only=True, torch_dtype=torch.float32)
    oracle = assets.oracle_lightning_style
    for comp, attr in (("unet", "unet"), ("te1", "text_encoder")):
        sd = getattr(pipe, attr).state_dict()
        assert len(sd) == len(oracle[comp])
        worst = max(_max_rel(sd[k], oracle[comp][k]) for k in oracle[comp])
        assert worst <= REL_TOL, comp
    vae = pipe.vae.state_dict()
    assert set(vae) == set(assets.base_sd["vae"])
    assert all(torch.equal(vae[k], v) for k, v in assets.base_sd["vae"].items())

    class _Cfg:  # the converter only reads config.hidden_size when text_projection is absent
        config = type("C", (), {"hidden_size": TINY.te2.hidden})

    te2 = convert_open_clip_checkpoint(_Cfg, load_tensors(lightning_style_fused), prefix="conditioner.embedders.1.model.")
    ref = oracle["te2"]
    assert set(ref) <= set(te2)
    assert max(_max_rel(te2[k], v) for k, v in ref.items()) <= REL_TOL
    assert sum(not torch.equal(te2[k], assets.base_sd["te2"][k]) for k in ref) == n_targets("attn", ("te2",))


# ---------------------------------------------------------------------------- formats diffusers cannot load


def _tensor_bytes(path: Path) -> dict[str, bytes]:
    with TensorFile(path) as f:
        return {k: bytes(f.read_bytes(k)) for k in f.keys()}


@pytest.mark.slow  # over a second on a quiet machine: full selection
def test_comfy_and_peft_raw_fuse_like_kohya_sgm(assets: FuseAssets, tmp_path: Path) -> None:
    common = dict(targets="lightning", components=("unet",), rank=4, alpha=2.0, seed=21)
    outputs = {}
    for fmt in ("kohya-sgm", "comfy", "peft-raw"):
        lora = write_lora(tmp_path / f"{fmt}.safetensors", "tiny", fmt=fmt, **common)
        outputs[fmt] = tmp_path / f"fused-{fmt}.safetensors"
        result = fuse(assets.base, loras=[(str(lora), 0.8)], output=outputs[fmt])
        assert result.modules_fused == n_targets("lightning")
    ref = _tensor_bytes(outputs["kohya-sgm"])
    base = _tensor_bytes(assets.base)
    assert sorted(ref) == sorted(base)  # same keys (the output order interleaves patched and copied tensors)
    assert {k for k in ref if ref[k] != base[k]} == target_keys("lightning")
    for fmt in ("comfy", "peft-raw"):
        assert _tensor_bytes(outputs[fmt]) == ref, fmt


# Dense references, written from the published formulas (not from lora_tools.lora.delta).


def _lora_ref(f: dict[str, torch.Tensor], shape: tuple[int, ...]) -> tuple[torch.Tensor, int]:
    up, down = f["up"].double(), f["down"].double()
    if "mid" in f:  # Tucker: delta[o,c,k,l] = sum_{p,j} up[o,p] mid[p,j,k,l] down[j,c]
        delta = torch.einsum("op,pjkl,jc->ockl", up.flatten(1), f["mid"].double(), down.flatten(1))
    else:
        delta = up.flatten(1) @ down.flatten(1)
    return delta.reshape(shape), down.shape[0]


def _loha_ref(f: dict[str, torch.Tensor], shape: tuple[int, ...]) -> tuple[torch.Tensor, int]:
    d = (f["w1a"].double() @ f["w1b"].double()) * (f["w2a"].double() @ f["w2b"].double())
    return d.reshape(shape), f["w1b"].shape[0]


def _lokr_ref(f: dict[str, torch.Tensor], shape: tuple[int, ...]) -> tuple[torch.Tensor, int]:
    w1 = f["w1"].double()
    o1, i1 = w1.shape
    w2 = (f["w2a"].double() @ f["w2b"].double()).reshape(shape[0] // o1, shape[1] // i1, *shape[2:])
    delta = torch.zeros(shape, dtype=torch.float64)
    for a in range(o1):  # kron written out: block (a, c) is w1[a, c] * w2
        for c in range(i1):
            delta[a * w2.shape[0]:(a + 1) * w2.shape[0], c * w2.shape[1]:(c + 1) * w2.shape[1]] = w1[a, c] * w2
    return delta, f["w2b"].shape[0]  # w2 is decomposed, so alpha / rank applies (rank of w2b)


_REFS = {"lora-tucker": _lora_ref, "dora": _lora_ref, "loha": _loha_ref, "lokr": _lokr_ref}
LYCORIS = {
    "lora-tucker": dict(fmt="kohya-diffusers", components=("unet",)),
    "loha": dict(fmt="kohya-sgm", components=("unet", "te2")),
    "lokr": dict(fmt="kohya-diffusers", components=("unet", "te1")),
    "dora": dict(fmt="kohya-sgm", components=("unet",)),
}


def _sample_targets(components: tuple[str, ...]) -> list[ModuleTarget]:
    """A linear, a 1x1 conv, two 3x3 convs, and a text-encoder module (a bigG q/k/v slice where present)."""
    targets = select_targets(TINY, "lightning", components)  # type: ignore[arg-type]
    unet = [t for t in targets if t.component == "unet"]
    picks = [next(t for t in unet if len(t.shape) == 2 and t.diffusers_key.endswith("attn2.to_k.weight")),
             next(t for t in unet if len(t.shape) == 4 and t.shape[2:] == (1, 1)),
             next(t for t in unet if len(t.shape) == 4 and t.shape[2:] == (3, 3)),
             [t for t in unet if len(t.shape) == 4 and t.shape[2:] == (3, 3)][-1]]
    te = [t for t in targets if t.component != "unet"]
    if te:
        picks.append(next((t for t in te if t.part is not None and t.part[0] == 1), te[0]))
    return picks


@pytest.mark.parametrize("algorithm", list(LYCORIS))
@pytest.mark.slow  # over a second on a quiet machine: full selection
def test_lycoris_and_dora_equal_dense_reference(assets: FuseAssets, tmp_path: Path, algorithm: str) -> None:
    spec = LYCORIS[algorithm]
    fmt, components = str(spec["fmt"]), tuple(spec["components"])  # type: ignore[arg-type]
    alpha, strength = 2.0, 0.7
    lora = write_lora(tmp_path / f"{algorithm}.safetensors", "tiny", fmt=fmt, algorithm=algorithm, targets="lightning",
                      components=components, rank=4, alpha=alpha, seed=31)
    out = tmp_path / "fused.safetensors"
    result = fuse(assets.base, loras=[(str(lora), strength)], output=out)
    assert result.modules_fused == n_targets("lightning", components)

    factors = load_tensors(lora)
    fused, base = TensorFile(out), TensorFile(assets.base)
    try:
        picks = _sample_targets(components)
        if algorithm == "lora-tucker":
            assert any("mid" in module_keys(t, fmt, algorithm)[0] and module_keys(t, fmt, algorithm)[0]["mid"] in factors
                       for t in picks), "no Tucker core among the sampled modules"
        for t in picks:
            keys, _ = module_keys(t, fmt, algorithm)
            f = {role: factors[k] for role, k in keys.items() if k in factors}
            delta, rank = _REFS[algorithm](f, t.shape)
            w = base.tensor(t.sgm_key).double()
            got = fused.tensor(t.sgm_key).double()
            if t.part is not None:
                i, n = t.part
                step = w.shape[0] // n
                w, got = w[i * step:(i + 1) * step], got[i * step:(i + 1) * step]
            delta = delta * (alpha / rank)
            if algorithm == "dora":  # PEFT/DoRA paper: magnitude / ||W + delta|| per output row
                combined = w + delta
                norm = combined.flatten(1).norm(dim=1).reshape(-1, *([1] * (w.dim() - 1)))
                full = combined * (f["dora_scale"].double().reshape(norm.shape) / norm)
                want = w + strength * (full - w)
            else:
                want = w + strength * delta
            assert not torch.equal(got, w), t.sgm_key
            rel = ((got - want).abs().max() / want.abs().max()).item()
            assert rel <= (1e-5 if algorithm == "dora" else REL_TOL), f"{algorithm} {t.diffusers_key}: {rel:.3g}"
    finally:
        fused.close()
        base.close()
    # every tensor outside the targets is the base's
    before = load_tensors(assets.base)
    changed = {k for k, v in load_tensors(out).items() if not torch.equal(v, before[k])}
    assert changed == target_keys("lightning", components)
